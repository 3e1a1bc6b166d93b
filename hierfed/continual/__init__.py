"""Continual federated learning: tasks, modalities and institutions that arrive over time
(the schedule), forgetting measured (the accuracy matrix and its metrics) and mitigated
(frozen old heads, EWC, replay). docs/continual.md."""

from hierfed.continual.metrics import aggregation_forgetting, summarize
from hierfed.continual.schedule import Schedule, Window, continual_on

__all__ = ["Schedule", "Window", "aggregation_forgetting", "continual_on", "summarize"]
