"""Switching neurons and experts off or on at inference (MoTE), and what to switch."""
from actsparse.intervention.apply import active_intervention, intervene, intervene_, unintervene_
from actsparse.intervention.select import from_contrast, random_units
from actsparse.intervention.switches import Intervention, Switch

__all__ = ["Intervention", "Switch", "intervene", "intervene_", "unintervene_", "active_intervention",
           "from_contrast", "random_units"]
