"""Example third-party hierfed plug-ins, registered by entry points (see pyproject.toml).

Nothing here is imported by hierfed itself: the registries find these objects through the
``hierfed.topologies``, ``hierfed.aggregators`` and ``hierfed.datasets`` entry point groups
the first time a name is looked up.
"""
