"""`mpis check`: the spiking network against its rate graph, and the toolchains' importers against mpis."""
