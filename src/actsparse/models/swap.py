"""The module-swap ledger: every in-place change actsparse makes to a model, and its undo.

``sparsify_`` installs sparse modules, ``accelerate_`` kernel-backed linears, ``relufy_`` and
``fatrelu_`` new activations; each records what it replaced here, under its owner's name::

    swap_module(model, "model.layers.0.mlp.act_fn", new, owner="sparsify")
    unwind(model, "sparsify")     # puts back the originals, newest first

Entries form a stack. ``unwind(model, owner)`` undoes the owner's entries, the entries of
every owner that declared it ``depends_on`` that owner, and every entry made after the
first of those (whoever made them), newest first: what was built on top of a change goes
with it. So ``desparsify_`` also removes an ``accelerate_`` (which depends on "sparsify")
without the sparsify layer knowing the decode layer, even when the sparse modules were
installed by hand. Hooks an owner registers on the model (``add_hook``) are removed with
its entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

LEDGER_ATTR = "_actsparse_ledger"


@dataclass
class Entry:
    owner: str
    path: str
    kind: str  # "module": ``before`` is the replaced module; "class": ``before`` is the old class; "hook"
    before: object = None
    handle: object = None
    depends_on: tuple[str, ...] = ()


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)

    def owners(self) -> list[str]:
        seen = []
        for e in self.entries:
            if e.owner not in seen:
                seen.append(e.owner)
        return seen

    def of(self, owner: str) -> list[Entry]:
        return [e for e in self.entries if e.owner == owner]


def ledger(model: nn.Module) -> Ledger:
    """The model's ledger (created empty on first use; not a submodule, not in the state dict)."""
    led = model.__dict__.get(LEDGER_ATTR)
    if led is None:
        led = Ledger()
        object.__setattr__(model, LEDGER_ATTR, led)
    return led


def set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` (unrecorded); returns what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


def swap_module(model: nn.Module, path: str, module: nn.Module, *, owner: str,
                depends_on: tuple[str, ...] = ()) -> nn.Module:
    """Replace the module at ``path`` by ``module``, recorded for ``owner``; returns the old one."""
    old = set_module(model, path, module)
    ledger(model).entries.append(Entry(owner, path, "module", old, depends_on=tuple(depends_on)))
    return old


def swap_class(model: nn.Module, path: str, cls: type, *, owner: str) -> None:
    """Change the class of the module at ``path`` in place (same object, parameters and state
    dict keys), recorded for ``owner``."""
    m = model.get_submodule(path)
    old = type(m)
    m.__class__ = cls
    ledger(model).entries.append(Entry(owner, path, "class", old))


def add_hook(model: nn.Module, handle, *, owner: str) -> None:
    """Record a hook handle that ``unwind(model, owner)`` removes."""
    ledger(model).entries.append(Entry(owner, "", "hook", handle=handle))


def _dependents(entries: list[Entry], owner: str) -> set[str]:
    owners = {owner}
    grew = True
    while grew:
        grew = False
        for e in entries:
            if e.owner not in owners and owners.intersection(e.depends_on):
                owners.add(e.owner)
                grew = True
    return owners


def has(model: nn.Module, owner: str) -> bool:
    led = model.__dict__.get(LEDGER_ATTR)
    return bool(led and led.of(owner))


def unwind(model: nn.Module, owner: str) -> list[Entry]:
    """Undo ``owner``'s changes, those of its dependents, and everything recorded after the
    first of them, newest first. Returns the undone entries (empty when there are none)."""
    led = model.__dict__.get(LEDGER_ATTR)
    if led is None:
        return []
    owners = _dependents(led.entries, owner)
    first = next((i for i, e in enumerate(led.entries) if e.owner in owners), None)
    if first is None:
        return []
    undone = led.entries[first:]
    for e in reversed(undone):
        if e.kind == "module":
            set_module(model, e.path, e.before)
        elif e.kind == "class":
            model.get_submodule(e.path).__class__ = e.before
        elif e.kind == "hook":
            e.handle.remove()
    del led.entries[first:]
    return undone
