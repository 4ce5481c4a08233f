"""Dense-to-MoE by co-activation (Read-ME style): balanced expert clustering, routers, the top-k expert MLP."""
from actsparse.moe.api import build, cluster, collect, moefy, router_recall
from actsparse.moe.modules import ExpertMLP, permute_mlp_
from actsparse.moe.plan import MoEPlan, apply_moe_, is_moefied, remove_moe_

__all__ = ["ExpertMLP", "MoEPlan", "apply_moe_", "build", "cluster", "collect", "is_moefied", "moefy",
           "permute_mlp_", "remove_moe_", "router_recall"]
