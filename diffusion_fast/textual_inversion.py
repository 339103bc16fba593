"""Textual inversion embeddings in our pipelines, with diffusers' ``load_textual_inversion`` semantics.

An embedding is one or more vectors for a new token: the token is added to the tokenizer, the text encoder's token
embeddings grow by as many rows, and the vectors are written there. A multi-vector embedding gets the tokens
``<tok>``, ``<tok>_1``, ... and a prompt's ``<tok>`` is spelt out as all of them before tokenizing (diffusers'
``maybe_convert_prompt``), for the prompt and the negative prompt alike.

Formats, as diffusers reads them: a diffusers file (``learned_embeds.safetensors`` / ``.bin``: one key, the token,
and its vectors), an Automatic1111 ``.pt`` (``string_to_param["*"]`` under ``name``), a bare tensor (the token must
be given), and an SDXL embedding holding ``clip_l`` and ``clip_g`` vectors, which diffusers loads with two calls (one
per encoder) and which here loads into both encoders in one. Pickled files are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import os

import torch

_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def read_embedding(source, weight_name=None):
    """A state dict (or a tensor) from a file, a folder holding diffusers' file, a dict or a tensor."""
    if torch.is_tensor(source) or isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a path, a state dict or a tensor, got "
                        f"{type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        names = [weight_name] if weight_name else _FILE_NAMES
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path!r} holds no textual inversion file (looked for {list(names)}; name "
                                    "another with weight_name=)")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such textual inversion file or folder: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # (pickle refuses what is not plain tensors and containers)
        raise ValueError(f"{path!r} is not a textual inversion file torch.load(weights_only=True) can read: "
                         f"{exc}") from None


def is_sdxl_embedding(state) -> bool:
    """Whether a read embedding holds SDXL's pair: ``clip_l`` vectors for the first encoder, ``clip_g`` for the
    second."""
    return isinstance(state, dict) and {"clip_l", "clip_g"} <= set(state)


def _resize(text_encoder, rows):
    """Grow or cut the text encoder's token embeddings to ``rows`` (rows added are written by the caller: no need
    for transformers' mean-and-covariance initialisation)."""
    try:
        text_encoder.resize_token_embeddings(rows, mean_resizing=False)
    except TypeError:  # transformers before 4.46 initialises them its older way
        text_encoder.resize_token_embeddings(rows)


def _token_and_vectors(state, token, where):
    """(token, (n, width) vectors) of one embedding, by diffusers' rules: a tensor needs ``token``; a one-key dict's
    key is the token; an Automatic1111 file's ``name`` is."""
    if torch.is_tensor(state):
        if token is None:
            raise ValueError(f"{where}: a bare tensor embedding needs token=")
        loaded, vectors = token, state
    elif len(state) == 1:
        loaded, vectors = next(iter(state.items()))
    elif "string_to_param" in state:
        loaded, vectors = state.get("name"), state["string_to_param"]["*"]
    else:
        raise ValueError(f"{where}: not a textual inversion state dict (one key, or Automatic1111's string_to_param); "
                         f"its keys are {sorted(map(str, state))[:8]}")
    if not torch.is_tensor(vectors) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise ValueError(f"{where}: the embedding must be a float tensor of one vector or (n, width), got "
                         f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    token = token if token is not None else loaded
    if not isinstance(token, str) or not token:
        raise ValueError(f"{where}: give token= (the file names none)")
    return token, vectors.reshape(-1, vectors.shape[-1])


class TextualInversionLoaderMixin:
    """``load_textual_inversion``, ``unload_textual_inversion`` and ``maybe_convert_prompt`` for our pipelines.

    The first load into a tokenizer keeps a copy of it as it was (``_inversions``, per tokenizer): unloading puts
    that copy's state back and adds again the embeddings that stay, with the rows they have, so no tokenizer
    internals are edited and the token ids come out as a fresh load would give them."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               *, weight_name=None):
        """Add one embedding (or a list of them, with a list of tokens) to ``tokenizer`` / ``text_encoder`` (default:
        the pipeline's first). An SDXL embedding (``clip_l`` and ``clip_g``) given to an SDXL pipeline without a
        tokenizer or encoder named loads into both encoders. Every problem (a token already there, a width that
        does not fit the encoder) is refused before anything changes."""
        sources = pretrained_model_name_or_path
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        states = [read_embedding(s, weight_name) for s in sources]
        if len(states) == 1 and len(tokens) > 1 and torch.is_tensor(states[0]):  # n vectors for n tokens
            states = list(states[0])
        if len(tokens) != len(states):
            raise ValueError(f"token: {len(tokens)} tokens for {len(states)} embeddings")
        named = [t for t in tokens if t is not None]
        if len(set(named)) < len(named):
            raise ValueError(f"token: duplicates in {tokens}")
        dual = [is_sdxl_embedding(s) for s in states]
        if any(dual) and tokenizer is None and text_encoder is None and getattr(self, "text_encoder_2", None):
            if not all(dual):
                raise ValueError("pretrained_model_name_or_path: SDXL (clip_l and clip_g) embeddings and others in "
                                 "one call; load them apart")
            pairs = [("clip_l", self.tokenizer, self.text_encoder), ("clip_g", self.tokenizer_2, self.text_encoder_2)]
            plans = [self._plan(tok, enc, [s[key] for s in states], tokens) for key, tok, enc in pairs if enc]
        else:
            tokenizer = tokenizer if tokenizer is not None else self.tokenizer
            text_encoder = text_encoder if text_encoder is not None else self.text_encoder
            if tokenizer is None or text_encoder is None:
                raise ValueError("tokenizer / text_encoder: this pipeline has no first text encoder (an SDXL "
                                 "refiner); pass tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2")
            plans = [self._plan(tokenizer, text_encoder, states, tokens)]
        for plan in plans:  # (all checked: now change them)
            self._remember(*plan)
            self._add(*plan)

    def _remember(self, tokenizer, text_encoder, rows):
        """Note the embeddings added to ``tokenizer`` (a copy of it as it was, on its first load), for unloading."""
        record = self.__dict__.setdefault("_inversions", {}).get(id(tokenizer))
        if record is None:
            record = {"tokenizer": tokenizer, "text_encoder": text_encoder, "pristine": copy.deepcopy(tokenizer),
                      "rows": text_encoder.get_input_embeddings().weight.shape[0], "embeddings": []}
            self._inversions[id(tokenizer)] = record
        record["embeddings"].append([name for name, _ in rows])

    def unload_textual_inversion(self, tokens=None, tokenizer=None, text_encoder=None):
        """Remove loaded embeddings (diffusers' ``unload_textual_inversion``): every one (``tokens=None``), or those
        of ``tokens``; a multi-vector embedding goes whole when any of its tokens is named (diffusers would leave its
        ``<tok>_1``... behind). Without ``tokenizer``, from every tokenizer and text encoder they were loaded into
        (both of SDXL's). The text encoder's token embeddings shrink back; a token not loaded is a ValueError."""
        records = list(self.__dict__.get("_inversions", {}).values())
        if tokenizer is not None or text_encoder is not None:
            records = [r for r in records if r["tokenizer"] is (tokenizer if tokenizer is not None else self.tokenizer)
                       and (text_encoder is None or r["text_encoder"] is text_encoder)]
        names = [tokens] if isinstance(tokens, str) else tokens
        if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
            raise TypeError(f"tokens must be a token, a list of tokens or None (all), got {tokens!r}")
        if names is not None and not names:  # (diffusers unloads every embedding then)
            raise ValueError("tokens: an empty list names no embedding; pass None to unload every one")
        loaded = {n for r in records for names_ in r["embeddings"] for n in names_}
        missing = sorted(set(names or ()) - loaded)
        if missing or not loaded:
            raise ValueError(f"tokens: {missing or 'none'} not loaded by load_textual_inversion here (loaded: "
                             f"{sorted(loaded)})")
        for record in records:
            gone = [e for e in record["embeddings"] if names is None or set(e) & set(names)]
            if gone:
                self._restore(record, [e for e in record["embeddings"] if e not in gone])

    @torch.no_grad()
    def _restore(self, record, keep):
        """Put the tokenizer back as it was and add again the embeddings in ``keep``, with their current rows."""
        tokenizer, text_encoder = record["tokenizer"], record["text_encoder"]
        weight = text_encoder.get_input_embeddings().weight
        rows = [(name, weight[tokenizer.convert_tokens_to_ids(name)].clone()) for names in keep for name in names]
        tokenizer.__dict__.clear()  # (in place: code holding the tokenizer keeps using it)
        tokenizer.__dict__.update(copy.deepcopy(record["pristine"]).__dict__)
        _resize(text_encoder, record["rows"])
        if rows:
            self._add(tokenizer, text_encoder, rows)
        record["embeddings"] = keep
        if not keep:
            del self._inversions[id(tokenizer)]

    @staticmethod
    def _plan(tokenizer, text_encoder, states, tokens):
        """(tokenizer, text encoder, [(token, vector)]) with diffusers' multi-vector tokens, checked."""
        width = text_encoder.get_input_embeddings().weight.shape[-1]
        vocab, rows, problems = tokenizer.get_vocab(), [], []
        for i, (state, token) in enumerate(zip(states, tokens)):
            token, vectors = _token_and_vectors(state, token, f"embedding {i}")
            names = [token] + [f"{token}_{j}" for j in range(1, vectors.shape[0])]
            taken = [n for n in (token, f"{token}_1") if n in vocab]
            if taken:
                problems.append(f"{taken[0]!r} is already in the tokenizer's vocabulary")
            if vectors.shape[-1] != width:
                problems.append(f"{token!r} has {vectors.shape[-1]}-wide vectors but the text encoder's token "
                                f"embeddings are {width} wide")
            rows += list(zip(names, vectors))
        if problems:
            raise ValueError("load_textual_inversion: " + "; ".join(problems))
        return tokenizer, text_encoder, rows

    @staticmethod
    @torch.no_grad()
    def _add(tokenizer, text_encoder, rows):
        embeddings = text_encoder.get_input_embeddings().weight
        dtype, device = embeddings.dtype, embeddings.device
        _resize(text_encoder, len(tokenizer) + len(rows))
        embeddings = text_encoder.get_input_embeddings().weight
        for token, vector in rows:
            tokenizer.add_tokens(token)
            embeddings[tokenizer.convert_tokens_to_ids(token)] = vector.to(device=device, dtype=dtype)

    def maybe_convert_prompt(self, prompt, tokenizer):
        """diffusers' prompt conversion: a multi-vector token spelt out as its tokens (``<t>`` -> ``<t> <t>_1 ...``)."""
        if isinstance(prompt, (list, tuple)):
            return [self.maybe_convert_prompt(p, tokenizer) for p in prompt]
        added = tokenizer.added_tokens_encoder
        if not any(f"{token}_1" in added for token in added):  # no multi-vector embedding: nothing to spell out
            return prompt
        for token in set(tokenizer.tokenize(prompt)):
            if token in added:
                replacement, i = token, 1
                while f"{token}_{i}" in added:
                    replacement += f" {token}_{i}"
                    i += 1
                prompt = prompt.replace(token, replacement)
        return prompt
