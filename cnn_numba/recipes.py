"""Default training recipes: the optimiser, learning rate, schedule and weight decay that
``train`` uses for a model (and dataset) when they are not given.

A recipe applies as a whole while the optimiser is the recipe's (not given, or the same): it
fills whichever of lr, schedule and weight decay were not given. Another optimiser drops the
recipe, and its own defaults apply (``DEFAULT_LR``, constant schedule, the optimiser's decay).
Models without a recipe train with SGD (momentum 0.9), lr 0.05, constant.

Each recipe cites the measured run behind it (``bench/results``; ``bench/accuracy.py`` reruns
the runs README quotes and checks their figures).
"""
from __future__ import annotations

import dataclasses

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    schedule: str = "constant"
    weight_decay: float | None = None  # None: the optimiser's own default

    def describe(self) -> str:
        decay = f", weight decay {self.weight_decay:g}" if self.weight_decay is not None else ""
        return f"{self.optimizer} lr {self.lr:g}, {self.schedule}{decay}"


PLAIN = Recipe("sgd", DEFAULT_LR["sgd"])

# (model, dataset) -> recipe; dataset None: any dataset. lr is the peak lr for onecycle.
# lenet5 with Adam and the 1cycle policy (lr up to 3e-3 over the first 30% of the batches, then
# down to ~0): one MNIST epoch 98.60% / 98.50% test (seeds 0, 1) against 97.74% with Adam at a
# constant 1e-3 and about 96% with SGD; 10 Fashion-MNIST epochs 91.17% against 90.1% and 88.5%
# (peak 5e-3: 98.69% and 90.99%). bench/README.md lists the candidates tried.
RECIPES = {
    ("lenet5", None): Recipe("adam", 3e-3, "onecycle"),
}


def recipe_for(model: str, dataset: str) -> Recipe:
    return RECIPES.get((model, dataset)) or RECIPES.get((model, None)) or PLAIN


def resolve(model: str, dataset: str, optimizer: str | None = None, lr: float | None = None,
            schedule: str | None = None, weight_decay: float | None = None) -> Recipe:
    """The settings a run uses: those given, the rest from the recipe of (model, dataset)."""
    recipe = recipe_for(model, dataset)
    if optimizer is not None and optimizer != recipe.optimizer:
        recipe = Recipe(optimizer, DEFAULT_LR[optimizer])
    return Recipe(recipe.optimizer, recipe.lr if lr is None else float(lr),
                  recipe.schedule if schedule is None else schedule,
                  recipe.weight_decay if weight_decay is None else weight_decay)


def help_text() -> str:
    """One line for --help: the recipes and the fallback."""
    listed = "; ".join(f"{m}{' on ' + d if d else ''}: {r.describe()}" for (m, d), r in RECIPES.items())
    return f"{listed}; other models: {PLAIN.describe()}"
