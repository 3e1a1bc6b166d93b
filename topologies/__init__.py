"""Built-in topology modules, registered through the ``hierfed.topologies`` entry point group."""
