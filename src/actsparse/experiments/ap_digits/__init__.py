"""The AP (Activating-while-Pruning) experiment on scikit-learn digits: data, small nets,
the seeded training loop, the sweep runner and its plots. The pruning library it runs
(host pruners, AP, dead-neuron rates) is :mod:`actsparse.prune`."""
