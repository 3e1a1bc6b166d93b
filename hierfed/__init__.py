"""hierfed: hierarchical, multi-modal multi-task federated fine-tuning of foundation models.

Entry points: ``python -m hierfed run|export|evaluate|predict`` and, from Python
(docs/python-api.md): ``hierfed.config.load_config``, ``hierfed.simulation.run``,
``hierfed.inference.load_run`` / ``evaluate_run`` / ``predict``, ``hierfed.export.export_run``
/ ``load_export``.
"""

__version__ = "0.1.0"
