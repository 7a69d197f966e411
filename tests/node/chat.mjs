// One non-streamed chat through the official `openai` Node SDK, as Node-based clients
// (OpenCode, Cline, Continue) make it. Prints JSON lines: the outcome, and a
// `past-timeout` marker once the SDK's own timeout has elapsed (so a test can tell that
// the request outlived it).
// usage: node chat.mjs BASE_URL API_KEY MODEL TIMEOUT_MS
import OpenAI from "openai";

const [baseURL, apiKey, model, timeoutMs] = process.argv.slice(2);
const timeout = Number(timeoutMs);
const client = new OpenAI({ baseURL, apiKey, timeout, maxRetries: 0 });
const say = (o) => console.log(JSON.stringify(o));
const past = new Promise((resolve) =>
  setTimeout(() => { say({ event: "past-timeout" }); resolve(); }, timeout + 300));

let result;
try {
  const reply = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "hi" }],
  });
  result = { event: "reply", content: reply.choices?.[0]?.message?.content ?? null,
             error: reply.error ?? null };
} catch (e) {
  result = { event: "error", name: e.constructor.name, status: e.status ?? null,
             message: String(e.message) };
}
say(result);
await past;
