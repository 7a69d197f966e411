"""The engine images a catalog uses: which are ours to build, which are pulled, and the
build itself through the Docker Engine API.

Ours are named `sparkstack/<name>:<tag>` and built from `images/<name>/Dockerfile` at
the root of the sparkstack repository (or `$SPARKSTACK_IMAGES_DIR`); the folder is the
build context. Everything else (NVIDIA's NGC images, the SGLang image) is pulled. The
list is derived from the catalog's `image:` values, plus the bases our Dockerfiles
build `FROM` (their `ARG BASE_IMAGE=` default), so `images list`, `images build` and
`check` agree without a second list to keep in sync.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from .config import Config

OWN_REPO = "sparkstack/"
NGC_REGISTRY = "nvcr.io"
BUILD_MINUTES = 20  # per image on the Spark; the first vLLM kernel compile can take 40
_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", re.M)
_FROM = re.compile(r"^\s*FROM\s+(\S+)", re.M | re.I)


class ImageError(Exception):
    """A build or pull that cannot go on; the message says why and what to do."""


def images_dir() -> Path:
    """$SPARKSTACK_IMAGES_DIR, else images/ at the root of the repository this module
    runs from (the folder is not part of the Python package)."""
    env = os.environ.get("SPARKSTACK_IMAGES_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "images"


def split_ref(ref: str) -> tuple[str, str]:
    """`repo[:tag][@digest]` → (repo, tag); the tag defaults to `latest` as Docker's does."""
    name = ref.split("@", 1)[0]
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repo, tag


def registry_of(ref: str) -> str:
    """The registry host of a reference (docker.io when the first part is no host)."""
    first, sep, _ = ref.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else "docker.io"


def dockerfile_args(dockerfile: Path) -> dict[str, str]:
    """The defaults of the Dockerfile's `ARG NAME=value` lines (quotes removed)."""
    return {k: v.strip("\"'") for k, v in _ARG.findall(dockerfile.read_text(encoding="utf-8"))}


def base_of(dockerfile: Path) -> str:
    """The image the Dockerfile's first stage builds FROM, with ARG defaults filled in."""
    text = dockerfile.read_text(encoding="utf-8")
    found = _FROM.search(text)
    if not found:
        raise ImageError(f"{dockerfile}: no FROM line")
    args = dockerfile_args(dockerfile)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), ""),
                  found.group(1))


@dataclass
class Image:
    ref: str  # as the catalog names it
    models: list[str] = field(default_factory=list)  # catalog models that run on it
    folder: Path | None = None  # images/<name> for ours
    base: str | None = None  # what ours builds FROM
    base_of: list[str] = field(default_factory=list)  # our images built FROM this one

    @property
    def own(self) -> bool:
        return self.ref.startswith(OWN_REPO)

    @property
    def name(self) -> str:
        """The folder name for ours (`vllm-gb10`), the reference for the rest."""
        return split_ref(self.ref)[0].removeprefix(OWN_REPO) if self.own else self.ref

    @property
    def buildable(self) -> bool:
        return self.folder is not None

    @property
    def default_tag(self) -> str | None:
        """The tag its Dockerfile builds when none is asked for (IMAGE_VERSION)."""
        if self.folder is None:
            return None
        return dockerfile_args(self.folder / "Dockerfile").get("IMAGE_VERSION")

    def fix(self) -> str:
        """How to get this image onto the machine, as a command to run."""
        if self.buildable:
            command = (self.name if split_ref(self.ref)[1] == self.default_tag else self.ref)
            return (f"sparkstack images build {command}  (about {BUILD_MINUTES} min; see "
                    "docs/images.md)")
        if self.own:
            return (f"no Dockerfile for it in {images_dir() / self.name}: run sparkstack "
                    "from its repository, or set SPARKSTACK_IMAGES_DIR to its images/ folder")
        if registry_of(self.ref) == NGC_REGISTRY:
            return (f"docker login nvcr.io (user $oauthtoken, password: your NGC API key), "
                    f"then docker pull {self.ref}")
        return f"docker pull {self.ref}"


def describe(ref: str, root: Path | None = None) -> Image:
    """The image a reference names: ours (with its folder, if there is one) or a pull."""
    return _own_image(ref, root or images_dir()) if ref.startswith(OWN_REPO) else Image(ref)


def _own_image(ref: str, root: Path) -> Image:
    image = Image(ref)
    folder = root / image.name
    if (folder / "Dockerfile").is_file():
        image.folder = folder
        image.base = base_of(folder / "Dockerfile")
    return image


def catalog_images(config: Config, root: Path | None = None) -> list[Image]:
    """Every image the catalog's Docker models use (their `image` and `requires.image`),
    then the bases our images are built from; in catalog order."""
    root = root or images_dir()
    found: dict[str, Image] = {}
    for m in config.models.values():
        if m.cfg.runtime != "docker":
            continue
        for ref in [m.cfg.image or "", *m.cfg.requires.image]:
            if not ref:
                continue
            if ref not in found:
                found[ref] = describe(ref, root)
            if m.id not in found[ref].models:
                found[ref].models.append(m.id)
    todo = list(found.values())
    while todo:
        image = todo.pop(0)
        if image.base and image.base.startswith(OWN_REPO):
            if image.base not in found:
                found[image.base] = _own_image(image.base, root)
                todo.append(found[image.base])
            found[image.base].base_of.append(image.ref)
    return list(found.values())


def find(images: Iterable[Image], name: str) -> Image | None:
    """An image by folder name (`vllm-gb10`), repository or full reference."""
    for image in images:
        if name in (image.ref, image.name, split_ref(image.ref)[0]):
            return image
    return None


def own_image(name: str, root: Path | None = None) -> Image:
    """One of ours by folder name or `sparkstack/<name>[:tag]`, without a catalog: the tag
    is the one asked for, else the Dockerfile's IMAGE_VERSION."""
    root = root or images_dir()
    folder_name, _, tag = name.removeprefix(OWN_REPO).partition(":")
    dockerfile = root / folder_name / "Dockerfile"
    if not dockerfile.is_file():
        known = sorted(p.parent.name for p in root.glob("*/Dockerfile")) if root.is_dir() else []
        raise ImageError(f"no image {name!r}: there is no {dockerfile}"
                         + (f" (images here: {', '.join(known)})" if known else
                            f" ({root} holds no images; run sparkstack from its repository "
                            "or set SPARKSTACK_IMAGES_DIR)"))
    tag = tag or dockerfile_args(dockerfile).get("IMAGE_VERSION") or "latest"
    return _own_image(f"{OWN_REPO}{folder_name}:{tag}", root)


def context_tar(folder: Path) -> bytes:
    """The image folder as a tar build context (file modes kept: scripts stay executable)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


# ---------------------------------------------------------------- Docker


async def local_images(docker: aiodocker.Docker, refs: Iterable[str]) -> dict[str, int | None]:
    """ref → size in bytes if the image is on this machine, else None."""
    out: dict[str, int | None] = {}
    for ref in refs:
        try:
            out[ref] = int((await docker.images.inspect(ref)).get("Size") or 0)
        except aiodocker.DockerError as e:
            if e.status != 404:
                raise
            out[ref] = None
    return out


def registry_auth(registry: str) -> dict[str, str] | None:
    """Credentials `docker login <registry>` stored, from the Docker CLI's config file or
    its credential helper; None when there are none."""
    config_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    entry = (config.get("auths") or {}).get(registry) or {}
    if entry.get("auth"):
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        return {"username": user, "password": password, "serveraddress": registry}
    helper = (config.get("credHelpers") or {}).get(registry) or config.get("credsStore")
    program = shutil.which(f"docker-credential-{helper}") if helper else None
    if not program:
        return None
    try:
        result = subprocess.run([program, "get"], input=registry, capture_output=True,
                                text=True, timeout=30, check=True)
        creds = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"username": creds.get("Username", ""), "password": creds.get("Secret", ""),
            "serveraddress": registry}


Progress = Callable[[str], None]


def _progress_line(item: dict[str, Any]) -> str | None:
    """One line of the daemon's build or pull stream, or None for noise."""
    if item.get("stream"):
        text = str(item["stream"]).rstrip("\n")
        return text if text.strip() else None
    if item.get("status"):
        parts = [str(item.get("id") or ""), str(item["status"]), str(item.get("progress") or "")]
        return " ".join(p for p in parts if p)
    return None


async def pull(docker: aiodocker.Docker, ref: str, on_line: Progress) -> None:
    """Pull an image that is no build of ours (a base), with the stored login if any."""
    registry = registry_of(ref)
    auth = registry_auth(registry)
    repo, tag = split_ref(ref)
    digest = ref.partition("@")[2]
    on_line(f"pulling {ref}" + ("" if auth else " (no stored login for " + registry + ")"))
    try:
        async for item in docker.images.pull(repo + ("@" + digest if digest else ""),
                                             tag=None if digest else tag, auth=auth,
                                             stream=True):
            if item.get("error"):
                raise aiodocker.DockerError(500, {"message": item["error"]})
            line = _progress_line(item)
            if line and "Downloading" not in line and "Extracting" not in line:
                on_line(line)
        if digest:  # a pull by digest leaves the image untagged: tag it as FROM names it
            image = await docker.images.inspect(repo + "@" + digest)
            await docker.images.tag(image["Id"], repo, tag=tag)
    except aiodocker.DockerError as e:
        login = (" Run `docker login nvcr.io` first (user $oauthtoken, password: your NGC "
                 "API key)." if registry == NGC_REGISTRY else "")
        raise ImageError(f"cannot pull {ref}: {e.message}.{login}") from e


async def build(docker: aiodocker.Docker, image: Image, on_line: Progress,
                *, no_cache: bool = False) -> str:
    """Build one of our images from its folder, streaming the daemon's progress lines;
    returns the new image id. Its base must be present (see `plan`)."""
    if image.folder is None:
        raise ImageError(f"{image.ref} is not built by sparkstack: {image.fix()}")
    tag = split_ref(image.ref)[1]
    last: list[str] = []
    image_id = ""
    try:
        async for item in docker.images.build(
                fileobj=io.BytesIO(context_tar(image.folder)), encoding="identity",
                tag=image.ref, buildargs={"IMAGE_VERSION": tag}, nocache=no_cache,
                rm=True, forcerm=True, stream=True):
            if item.get("error"):
                raise aiodocker.DockerError(500, {"message": item["error"]})
            if isinstance(item.get("aux"), dict) and item["aux"].get("ID"):
                image_id = item["aux"]["ID"]
            line = _progress_line(item)
            if line:
                last = [*last[-19:], line]
                on_line(line)
    except aiodocker.DockerError as e:
        step = next((ln for ln in reversed(last) if ln.startswith("Step ")), "")
        raise ImageError(f"building {image.ref} failed"
                         + (f" at {step}" if step else "") + f": {e.message}") from e
    if not image_id:
        image_id = (await docker.images.inspect(image.ref))["Id"]
    return image_id


async def plan(docker: aiodocker.Docker, targets: list[Image], root: Path | None = None,
               *, rebuild: bool = True) -> list[Image]:
    """What to build, in order: each target after the bases of ours it needs that are
    not on this machine yet. A target is built even if present when `rebuild`."""
    root = root or images_dir()
    order: list[Image] = []
    seen: set[str] = set()

    async def visit(image: Image) -> None:
        if image.ref in seen:
            return
        seen.add(image.ref)
        if image.base and image.base.startswith(OWN_REPO):
            base = _own_image(image.base, root)
            if (await local_images(docker, [base.ref]))[base.ref] is None:
                if base.folder is None:
                    raise ImageError(f"{image.ref} builds FROM {base.ref}: {base.fix()}")
                await visit(base)
        order.append(image)

    for image in targets:
        if rebuild or (await local_images(docker, [image.ref]))[image.ref] is None:
            await visit(image)
    return order


def build_notice(order: list[Image]) -> str:
    """What a user must know before the builds start: how long, and the NGC login."""
    ngc = [i.name for i in order if i.base and registry_of(i.base) == NGC_REGISTRY]
    return (f"Building {len(order)} image(s): {', '.join(i.ref for i in order)}.\n"
            f"Each takes about {BUILD_MINUTES} minutes on a DGX Spark (a first vLLM kernel "
            "compile up to 40)"
            + (f"; {', '.join(ngc)} start(s) from NVIDIA's NGC images: run `docker login "
               "nvcr.io` first (user $oauthtoken, password: your NGC API key)." if ngc
               else "."))


async def ensure_external_base(docker: aiodocker.Docker, image: Image, on_line: Progress) -> None:
    """Pull the base of one of ours when it is someone else's image and not here yet."""
    if (image.base and not image.base.startswith(OWN_REPO)
            and (await local_images(docker, [image.base]))[image.base] is None):
        await pull(docker, image.base, on_line)
