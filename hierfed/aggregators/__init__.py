"""Aggregators (registered in ``hierfed.registry.AGGREGATORS``) and server optimizers."""

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.aggregators.fair import QFFL, AgnosticFL, ContributionWeighted
from hierfed.aggregators.mean import WeightedMean
from hierfed.aggregators.noise_aware import NoiseAwareMean
from hierfed.aggregators.robust import CoordinateMedian, Krum, NormBoundedMean, TrimmedMean
from hierfed.aggregators.server_opt import FedAdam, FedAvgM, FedYogi, ServerOptimizer, ServerSGD

__all__ = [
    "AggContext",
    "Aggregator",
    "AgnosticFL",
    "ContributionWeighted",
    "QFFL",
    "CoordinateMedian",
    "Krum",
    "NoiseAwareMean",
    "NormBoundedMean",
    "TrimmedMean",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "ServerSGD",
    "WeightedMean",
]
