"""The pretraining methods behind `energyvit pretrain --method`, each a PretrainingMethod
(methods.base): `energy`, the project's method (methods.energy), and `mae`, the MAE baseline on
the same encoder (methods.mae), for comparisons."""

METHODS = ("energy", "mae")
