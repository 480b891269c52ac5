"""Model anatomy: where a model's embeddings, transformer blocks and head are.

:func:`find_layers` finds the block list; :class:`ModelStructure` splits every parameter into
embeddings, blocks (lowest first) and head. Freezing (:mod:`fastft.freezing`) and parameter groups
(:mod:`fastft.param_groups`) both read a model through it.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

__all__ = ["find_layers", "ModelStructure", "RequiresGradAttributeError", "check_model", "check_int", "check_bool"]

# Last name component of the block list in Hugging Face models: BERT/RoBERTa/ViT ``encoder.layer``,
# GPT-2 ``transformer.h``, Llama/Mistral ``model.layers``, T5 ``encoder.block``, timm ``blocks``.
_STACK_NAMES = frozenset({"layer", "layers", "h", "block", "blocks"})


class RequiresGradAttributeError(ValueError, AttributeError):
    """``module.requires_grad = ...`` was set on an ``nn.Module``: a no-op that freezes nothing.

    Raised by every entry point of :mod:`fastft.freezing` before it changes anything. It is both a
    ValueError (bad input) and an AttributeError (a misused attribute).
    """


# --------------------------------------------------------------------------------------------------
# Input checks


def check_model(model: Any, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.{where}: expected a torch.nn.Module, got {type(model).__name__}")
    bad = [name or "<the model itself>" for name, m in model.named_modules() if "requires_grad" in vars(m)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RequiresGradAttributeError(
            f"fastft.{where}: `requires_grad` was assigned as an attribute of the module(s) {shown}. On an "
            "nn.Module that only creates a plain attribute: nothing is frozen and every parameter still gets "
            "gradients. Write `module.requires_grad_(False)` (the method, with the underscore) or use "
            "fastft.freeze_layers(model, n), and remove the stray attribute with `del module.requires_grad`.")


def check_int(value: Any, name: str, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fastft.{where}: {name} must be an int in [{low}, {high}], got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"fastft.{where}: {name}={value} is out of range: the model has {high} blocks, "
                         f"so {name} must be in [{low}, {high}]")
    return value


def check_bool(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fastft.{where}: {name} must be True or False, got {value!r}")
    return value


def _describe(name: str, lst: nn.Module) -> str:
    types = sorted({type(c).__name__ for c in lst})
    return f"{name or '<the model itself>'} ({len(lst)} x {'/'.join(types)})"


def _find_stack(root: nn.Module, prefix: str, where: str) -> Tuple[str, nn.Module]:
    """The block list of a single-stack model: (qualified name, ModuleList or Sequential)."""
    lists = [(n, m) for n, m in root.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]

    def top_level(cands):
        # A list inside an item of another candidate (MoE experts, T5Block.layer) is not a block stack.
        names = [n for n, _ in cands]
        return [(n, m) for n, m in cands
                if not any(o != n and (o == "" or n.startswith(o + ".")) for o in names)]

    def qualified(n):
        return ".".join(x for x in (prefix, n) if x)

    known = top_level([(n, m) for n, m in lists if n.rsplit(".", 1)[-1] in _STACK_NAMES])
    same_type = top_level([(n, m) for n, m in lists if len({type(c) for c in m}) == 1])
    for tier, rule in ((known, "named like a block list"), (same_type, "of same-type blocks")):
        if not tier:
            continue
        longest = max(len(m) for _, m in tier)
        best = [(n, m) for n, m in tier if len(m) == longest]
        if len(best) == 1:
            return qualified(best[0][0]), best[0][1]
        listing = "; ".join(_describe(qualified(n), m) for n, m in tier)
        raise ValueError(
            f"fastft.{where}: cannot tell which module list holds the transformer blocks: {len(best)} lists "
            f"{rule} are equally long. Candidates: {listing}. Pass the right one explicitly, e.g. "
            f"layers=model.{qualified(best[0][0]) or '<name>'}")
    listing = "; ".join(_describe(qualified(n), m) for n, m in lists) or "none"
    raise ValueError(
        f"fastft.{where}: found no list of transformer blocks in {type(root).__name__} (looked for an "
        f"nn.ModuleList/nn.Sequential named {sorted(_STACK_NAMES)} or holding blocks of one type; module lists "
        f"present: {listing}). Pass the blocks explicitly with layers=[...], lowest first")


def _encoder_decoder(model: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(encoder, decoder) of a Hugging Face encoder-decoder model, else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        enc, dec = model.get_encoder(), model.get_decoder()
    except Exception:
        return None
    if not (isinstance(enc, nn.Module) and isinstance(dec, nn.Module)) or model in (enc, dec) or enc is dec:
        return None
    return enc, dec


class ModelStructure:
    """How a model splits into embeddings, blocks (lowest first) and head, parameter by parameter.

    Attributes:
        layers: the blocks, lowest first (see :func:`find_layers`); ``num_layers`` of them, named
            ``block_names``.
        embedding_modules / embedding_params: the embeddings (a weight tied to them counts as theirs).
        block_params: per block, its parameters (an encoder-decoder's encoder extras join its top block).
        head_params: everything else (pooler, final norm, task head).
        param_names: parameter -> its qualified name.
    Raises:
        ValueError / TypeError: no block list found, several equally likely, or bad ``layers``.
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[nn.Module]], where: str) -> None:
        names = {}
        for n, m in model.named_modules():
            names.setdefault(m, n)
        self.encoder = None
        if layers is None:
            self.layers, block_names = self._locate(model, names, where)
        else:
            self.layers, block_names = self._check_layers(layers, names, where)
        n_blocks = len(self.layers)

        inside_blocks = {x for b in self.layers for x in b.modules()}
        ancestors = set()
        for bn in block_names:
            parts = bn.split(".")
            ancestors.update(".".join(parts[:i]) for i in range(len(parts)))

        def module_or_none(getter):
            try:
                m = getattr(model, getter)()
            except Exception:
                return None
            return m if isinstance(m, nn.Module) else None

        in_emb, out_emb = module_or_none("get_input_embeddings"), module_or_none("get_output_embeddings")
        self.embedding_modules: List[nn.Module] = []
        chosen: List[str] = []
        for n, m in model.named_modules():
            if m in inside_blocks or n in ancestors or any(n.startswith(c + ".") for c in chosen):
                continue
            if out_emb is not None and any(x is out_emb for x in m.modules()) and m is not in_emb:
                continue
            if next(m.parameters(), None) is None:
                continue
            leaf = n.rsplit(".", 1)[-1].lower()
            if (isinstance(m, nn.Embedding) or m is in_emb or "embed" in type(m).__name__.lower()
                    or "embed" in leaf):
                self.embedding_modules.append(m)
                chosen.append(n)

        self.param_names: Dict[Tensor, str] = {}
        for n, p in model.named_parameters():
            self.param_names.setdefault(p, n)
        seen = set()

        def take(params) -> List[Tensor]:
            out = []
            for p in params:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
            return out

        emb = [p for m in self.embedding_modules for p in m.parameters()]
        for a in sorted(ancestors):  # timm-style cls_token / pos_embed held directly by the model
            owner = model.get_submodule(a)
            emb += [p for pn, p in owner.named_parameters(recurse=False)
                    if "embed" in pn.lower() or pn.lower().endswith(("token", "tokens"))]
        self.embedding_params = take(emb)
        self.block_params = [take(b.parameters()) for b in self.layers]
        # Encoder-decoder: what the encoder holds besides its embeddings and blocks (T5's final norm)
        # lies between its top block and the decoder, so it freezes and decays with the encoder's top block.
        self.attached_modules: Dict[int, List[nn.Module]] = {}
        if self.encoder is not None:
            enc, top = self.encoder
            extra = [c for c in enc.children() if c not in inside_blocks and c not in self.embedding_modules
                     and names.get(c) not in ancestors and next(c.parameters(), None) is not None]
            self.attached_modules[top] = extra
            self.block_params[top] += take([p for c in extra for p in c.parameters()]
                                           + list(enc.parameters(recurse=False)))
        self.head_params = take(model.parameters())
        self.block_names = block_names
        self.num_layers = n_blocks

    def _locate(self, model, names, where):
        pair = _encoder_decoder(model)
        if pair is None or any(part not in names for part in pair):
            name, stack = _find_stack(model, "", where)
            return stack, [f"{name}.{i}" if name else str(i) for i in range(len(stack))]
        blocks, block_names = [], []
        for part in pair:
            name, stack = _find_stack(part, names[part], where)
            blocks += list(stack)
            block_names += [f"{name}.{i}" for i in range(len(stack))]
            if part is pair[0]:
                self.encoder = (part, len(blocks) - 1)
        return nn.ModuleList(blocks), block_names

    @staticmethod
    def _check_layers(layers, names, where):
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"fastft.{where}: layers must be a list of blocks (nn.ModuleList, nn.Sequential or a "
                            f"Python list), lowest first; got a single {type(layers).__name__}")
        try:
            blocks = list(layers)
        except TypeError:
            raise TypeError(f"fastft.{where}: layers must be a list of blocks, lowest first; "
                            f"got {type(layers).__name__}") from None
        if not blocks:
            raise ValueError(f"fastft.{where}: layers is empty; pass the model's transformer blocks, lowest first")
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"fastft.{where}: layers[{i}] is a {type(b).__name__}, expected an nn.Module block")
            if b not in names:
                raise ValueError(f"fastft.{where}: layers[{i}] ({type(b).__name__}) is not a submodule of the model; "
                                 "pass blocks of the model you are freezing")
        if len(set(map(id, blocks))) != len(blocks):
            raise ValueError(f"fastft.{where}: layers holds the same block more than once")
        for i, b in enumerate(blocks):
            for j, c in enumerate(blocks):
                if i != j and any(x is c for x in b.modules()):
                    raise ValueError(f"fastft.{where}: layers[{j}] lies inside layers[{i}]; pass sibling blocks")
        stack = layers if isinstance(layers, (nn.ModuleList, nn.Sequential)) else nn.ModuleList(blocks)
        return stack, [names[b] for b in blocks]


def find_layers(model: nn.Module) -> nn.Module:
    """Return the model's stack of transformer blocks, lowest block first.

    Known Hugging Face layouts are found by name: BERT/RoBERTa/MiniLM/ViT ``encoder.layer``, GPT-2
    ``transformer.h``, Llama/Mistral/SmolLM ``model.layers``, T5 ``encoder.block`` (also timm
    ``blocks``). Otherwise the generic rule applies: the longest ``nn.ModuleList``/``nn.Sequential``
    whose items are all of one type. Lists nested inside another candidate's items (MoE experts, the
    sub-layers of a T5 block) never count. For a Hugging Face encoder-decoder (T5, BART, ...) the
    result is a new ``nn.ModuleList`` of the encoder's blocks followed by the decoder's, the order
    data flows through them; otherwise it is the model's own list object.

    Args:
        model: the model (any ``nn.Module``).
    Returns:
        an ``nn.ModuleList`` (or the model's ``nn.Sequential``) of the blocks.
    Raises:
        ValueError: no block list was found, or several are equally likely; the message lists the
            candidates. Pass ``layers=`` to :func:`freeze_layers` / :func:`layerwise_lr_groups` then.
        RequiresGradAttributeError: some module had ``requires_grad`` assigned as an attribute.
    """
    check_model(model, "find_layers")
    return ModelStructure(model, None, "find_layers").layers


