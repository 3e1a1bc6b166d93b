"""hierfed: hierarchical, multi-modal multi-task federated fine-tuning of foundation models.

Entry points: ``hierfed.simulation.run(cfg)`` and ``python -m hierfed run``.
"""

__version__ = "0.1.0"
