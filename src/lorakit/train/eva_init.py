"""`lorakit train --init eva`: the adapter re-made with EVA from the run's own training rows (lorakit.eva).

`prepare` adds a plain adapter (EVA needs data, which is loaded after the model); once the training rows are
tokenized, `reinit_with_eva` replaces it by EVA's: A from the layer inputs of the first MAX_BATCHES batches
(of --batch-size rows, in file order), B = 0, the ranks redistributed (rho 2, PEFT's default) and alpha
following the rank. The result depends only on the model and the data, so a --resume recomputes the same
ranks before its checkpoint is loaded into them.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_BATCHES = 64  # at most this many SVD batches (PEFT cycles the data until convergence, without a bound)
RHO, TAU = 2.0, 0.99  # PEFT's EvaConfig defaults


def reinit_with_eva(prepared, examples: list, batch_size: int, pad_id: int, say: Callable[[str], None]):
    """Replace adapter "default" of `prepared.model` by EVA's (see the module doc); updates prepared.lora_config.

    Raises:
        ValueError: as lorakit.eva.add_eva_adapter (e.g. rows too short for the components).
    """
    from ..adapters import delete_adapter, get_adapter
    from ..data import collate
    from ..eva import add_eva_adapter

    model = prepared.model
    config = get_adapter(model, "default").config
    n = min(len(examples), MAX_BATCHES * batch_size)
    batches = [collate(examples[i : i + batch_size], pad_id) for i in range(0, n, batch_size)]
    delete_adapter(model, "default")
    result = add_eva_adapter(model, config.replace(init="default"), batches, rho=RHO, tau=TAU,
                             max_batches=MAX_BATCHES)  # fmt: skip
    prepared.lora_config = get_adapter(model, "default").config
    ranks = sorted(result.ranks.values())
    state = "converged" if result.converged else f"not converged after {MAX_BATCHES} batches (tau {TAU})"
    say(
        f"eva: A from the layer inputs of {result.batches} batches ({state}); ranks {ranks[0]}..{ranks[-1]} "
        f"(budget {config.r} x {len(ranks)}), {sum(k == 0 for k in ranks)} modules at rank 0 not adapted"
    )
    return result
