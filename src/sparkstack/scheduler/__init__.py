"""Scheduling: the per-model state machine (`scheduler`) and the eviction policy (`eviction`)."""

from .eviction import Resident, plan
from .scheduler import Effects, ModelState, Scheduler, State, Ticket

__all__ = ["Effects", "ModelState", "Resident", "Scheduler", "State", "Ticket", "plan"]
