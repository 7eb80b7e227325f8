"""EVA (Paischer et al. 2024, "Explained Variance Adaptation"): a data-driven LoRA init.

    ranks = add_eva_adapter(model, config, batches, rho=2.0, tau=0.99, max_batches=64)

For each target layer, A = the top right-singular vectors (principal components) of the layer's inputs over
the training batches (the tokens with a loss: attention_mask and labels != -100), B = 0, so the model is
unchanged at init and the first updates move along the directions the data uses most. With rho > 1 the
rank budget (r per layer in total) is redistributed: every layer may take up to round(r·rho) components, and
the budget goes to the components with the highest explained-variance ratio over all layers (a layer can get
rank 0: it is then not adapted); with `adjust_scaling` alpha follows the rank (alpha·r_new/r), so the scale
per component is unchanged.

This is PEFT's algorithm (`peft.tuners.lora.eva`, `get_eva_state_dict`; tested to give the same A and the same
ranks on the same model and batches): PEFT's incremental PCA (a port of scikit-learn's, with
`torch.svd_lowrank`, q = 2·components, 4 iterations, seed 42), one SVD per group of layers that receive
the same input (q/k/v, gate/up), batches fed until every layer's components needed for its rank have a
cosine similarity >= tau with the previous batch's. One difference: PEFT cycles the data until convergence
without limit; lorakit stops after `max_batches` SVD batches and uses what it has (`EvaResult.converged`
says whether it converged). Whitening (PEFT's `whiten`) is not offered.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import cycle

import torch
from torch import Tensor, nn

from .config import LoraConfig

__all__ = ["EvaResult", "IncrementalPCA", "add_eva_adapter", "eva_components"]


class IncrementalPCA:
    """PEFT's `IncrementalPCA` (lowrank=True, seed 42), the part EVA uses: `partial_fit(X)` on (n, features)."""

    def __init__(self, n_components: int, niter: int = 4, seed: int = 42):
        self.n_components, self.q, self.niter, self.seed = n_components, 2 * n_components, niter, seed
        self.components_: Tensor | None = None

    def partial_fit(self, X: Tensor) -> None:
        X = X.float().clone()
        n = X.shape[0]
        first = self.components_ is None
        if first:
            self.mean_, self.var_, self.seen = None, None, torch.tensor([0])
        mean, var, total = _mean_and_var(X, self.mean_, self.var_, self.seen)
        if first:
            X -= mean
        else:
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            correction = torch.sqrt((self.seen.double() / total) * n) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vt = V.mH
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])  # sklearn's svd_flip
        Vt = Vt * signs.view(-1, 1)
        k = self.n_components
        self.seen, self.mean_, self.var_ = total, mean, var
        self.components_, self.singular_values_ = Vt[:k], S[:k]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * total))[:k]


def _mean_and_var(X: Tensor, last_mean, last_var, last_n) -> tuple[Tensor, Tensor, Tensor]:
    """Running column mean and variance (float64 sums; scikit-learn's `_incremental_mean_and_var`)."""
    new_n = torch.tensor([X.shape[0]])
    total = last_n + new_n
    last_sum = torch.zeros(X.shape[1], dtype=torch.float64) if last_mean is None else last_mean * last_n
    new_sum = X.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / total
    temp = X - new_sum / new_n
    correction = temp.sum(dim=0, dtype=torch.float64).square()
    new_unnorm = temp.square().sum(dim=0, dtype=torch.float64) - correction / new_n
    if last_var is None:
        return mean, new_unnorm / total, total
    ratio = last_n.double() / new_n
    unnorm = last_var * last_n + new_unnorm + ratio / total * (last_sum / ratio - new_sum).square()
    return mean, unnorm / total, total


@dataclass
class EvaResult:
    components: dict[str, Tensor]  # module name -> A (rank, in_features); rank 0: an empty (0, in) tensor
    ranks: dict[str, int]  # module name -> its rank after redistribution (0: not adapted)
    converged: bool  # every layer's needed components converged within max_batches
    batches: int  # SVD batches fed


class _Layer:
    """One SVD per group of layers with equal inputs: the hook feeds the representative's inputs."""

    def __init__(self, n_components: int, tau: float):
        self.svd, self.tau = IncrementalPCA(n_components), tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)
        self.active, self.mask = True, None

    def __call__(self, module, args, output) -> None:
        if not self.active:
            return
        x = args[0]
        x = x[self.mask.T.unbind()] if self.mask is not None else x.reshape(-1, x.shape[-1])
        if x.shape[0] < self.svd.n_components:
            return  # too few tokens in this batch for the components (PEFT skips it too)
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        self.svd.partial_fit(x.float())
        if previous is not None:
            sim = nn.functional.cosine_similarity(self.svd.components_, previous)
            self.converged = sim >= self.tau


def eva_components(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    ranks: dict[str, int],
    rho: float = 2.0,
    tau: float = 0.99,
    max_batches: int = 64,
    use_label_mask: bool = True,
) -> EvaResult:
    """EVA's A per target module (see the module docstring). The model is not changed.

    Args:
        batches: collate() dicts (input_ids, attention_mask, labels; (batch, seq)); cycled, at most
            `max_batches` SVD forwards (plus one first forward that finds layers with equal inputs).
        ranks: target module name -> its rank r (the budget is their sum; each may take round(r·rho)).
    Raises:
        ValueError: no batches, rho < 1, tau outside [0, 1], max_batches < 1, or a layer that saw fewer
            tokens than its components in every batch.
    """
    batches = list(batches)
    if not batches or rho < 1 or not 0 <= tau <= 1 or max_batches < 1:
        raise ValueError(
            f"eva: batches={len(batches)}, rho={rho}, tau={tau}, max_batches={max_batches} invalid: expected "
            "at least one batch, rho >= 1, 0 <= tau <= 1, max_batches >= 1"
        )
    device, was_training = next(model.parameters()).device, model.training
    max_comp = {n: round(r * rho) for n, r in ranks.items()}
    model.eval()  # no dropout in the layer inputs (restored below)
    try:
        groups = _equal_input_groups(model, list(ranks), _on(batches[0], device), use_label_mask)
    except BaseException:
        model.train(was_training)
        raise
    rep_of = {member: g[0] for g in groups for member in g[1:]}
    for g in groups:
        for n in g:
            max_comp[n] = max(max_comp[m] for m in g)
    layers = {n: _Layer(max_comp[n], tau) for n in ranks if n not in rep_of}
    hook_map = {**{n: n for n in layers}, **rep_of}
    handles = [model.get_submodule(n).register_forward_hook(layers[n]) for n in layers]
    rank_dist, fed, converged = dict(max_comp), 0, False
    try:
        for batch in cycle(batches):
            for n, layer in layers.items():
                layer.active = not bool(torch.all(layer.converged[: rank_dist[n]]))
            if not any(layer.active for layer in layers.values()):
                converged = True
                break
            if fed == max_batches:
                break
            batch = _on(batch, device)
            for layer in layers.values():
                layer.mask = _token_mask(batch, use_label_mask)
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            fed += 1
            if all(layer.svd.components_ is not None for layer in layers.values()):
                rank_dist = _distribute(layers, hook_map, rep_of, sum(ranks.values()), max_comp)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [n for n, layer in layers.items() if layer.svd.components_ is None]
    if empty:
        raise ValueError(
            f"eva: layers {empty} never saw enough tokens for their components; use larger batches"
        )
    comps = {n: layers[hook_map[n]].svd.components_[:k].clone() for n, k in rank_dist.items()}
    return EvaResult(comps, {n: int(k) for n, k in rank_dist.items()}, converged, fed)


def _on(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _token_mask(batch: dict[str, Tensor], use_label_mask: bool) -> Tensor:
    """(n, 2) indices of the tokens whose layer inputs go into the SVD: not padding, and with a loss."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != -100)
    return mask.nonzero()


def _equal_input_groups(model, names: list[str], batch, use_label_mask: bool) -> list[list[str]]:
    """Groups (2 or more, in model order) of target modules that receive the same input on `batch`."""
    seen: dict[str, Tensor] = {}
    mask = _token_mask(batch, use_label_mask)

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, args[0][mask.T.unbind()].detach().clone())

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for n in names:
        for g in groups:
            if seen[g[0]].shape == seen[n].shape and torch.equal(seen[g[0]], seen[n]):
                g.append(n)
                break
        else:
            groups.append([n])
    return [g for g in groups if len(g) > 1]


def _distribute(layers, hook_map, rep_of, budget: int, max_comp) -> dict[str, int]:
    """The `budget` components with the highest explained-variance ratio over all layers, counted per layer
    (PEFT's `_get_rank_distribution`: a group's representative keeps the highest rank of its group)."""
    ratios = {n: layer.svd.explained_variance_ratio_[: max_comp[n]] for n, layer in layers.items()}
    keys, values = zip(*[(k, c) for k, rep in hook_map.items() for c in ratios[rep]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    out = {k: counts.get(k, 0) for k in hook_map}
    for k, rep in rep_of.items():
        if out[rep] < out[k]:
            out[rep], out[k] = out[k], out[rep]
    return out


def add_eva_adapter(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, Tensor]],
    name: str = "default",
    rho: float = 2.0,
    tau: float = 0.99,
    max_batches: int = 64,
    adjust_scaling: bool = True,
) -> EvaResult:
    """Add adapter `name` with EVA's A (B = 0) and redistributed ranks; see the module docstring.

    The adapter's config gets the ranks (and, with adjust_scaling, alpha·r_new/r) as per-module rank_pattern /
    alpha_pattern entries; modules given rank 0 are left out of its targets. Raises as `eva_components` and
    `add_adapter`.
    """
    from .adapters import add_adapter, get_adapter
    from .inject import find_targets, is_linear

    if config.init != "default" or config.use_dora:
        raise ValueError(
            f"eva: init={config.init!r}, use_dora={config.use_dora}: expected a plain LoRA config"
        )
    targets = find_targets(model, config)
    other = [n for n in targets if not is_linear(model.get_submodule(n))]
    if other:  # PEFT's EVA leaves Embedding / Conv layers out too: their inputs are no feature vectors
        raise ValueError(f"eva: targets {other[:3]} are not Linear layers; expected Linear targets only")
    ranks = {n: config.rank_for(n) for n in targets}
    result = eva_components(model, batches, ranks, rho, tau, max_batches)
    kept = [n for n in targets if result.ranks[n] > 0]
    if not kept:
        raise ValueError("eva: every target module got rank 0")
    rank_pattern, alpha_pattern = {}, {}
    for n in kept:
        k = result.ranks[n]
        alpha = config.alpha_for(n) * (k / ranks[n] if adjust_scaling and k != ranks[n] else 1.0)
        if k != config.r:
            rank_pattern[re.escape(n)] = k
        if alpha != config.alpha:
            alpha_pattern[re.escape(n)] = alpha
    cfg = config.replace(targets=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    add_adapter(model, cfg, name=name)
    with torch.no_grad():
        for n in get_adapter(model, name).lora_modules:
            weights = model.get_submodule(n).lora[name]
            weights.A.copy_(result.components[n].to(weights.A.dtype))
    return result
