"""What a weight transfer loaded, and what it could not: :class:`TransferReport` and :class:`TransferError`.

Both are re-exported by :mod:`medssl.networks.transfer` (import them from there). Keys are the downstream
network's names. The *pretrained part* of a network is what an SSL checkpoint must fill
(:func:`medssl.networks.downstream.transfer_keys`): the encoder, plus the decoder where the SSL encoder
pretrained one (BasicUNet from Models Genesis, SegResNet from ``segresnet_unet``/SparK, MONAI UNet from
``monai_unet``/SparK). Everything else (decoder / head otherwise, the output conv ``final_conv`` / ``conv_final``,
the UNet's top up block ``model.2``) is *new*: trained from scratch by design, listed but never a failure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from medssl.errors import MedsslError
from medssl.networks.downstream import DOWNSTREAM_KINDS, decoder_key_prefixes, is_encoder_key

__all__ = ["TransferReport", "TransferError"]


@dataclass
class TransferReport:
    """Outcome of :func:`medssl.networks.transfer.transfer_weights` (keys are the downstream network's names).

    Attributes:
        target: downstream kind.
        source: checkpoint path / URI.
        matched: pretrained-part keys loaded (encoder, and a pretrained decoder).
        missing: pretrained-part keys of the network the checkpoint did not provide.
        unexpected: checkpoint keys with no destination in the network's pretrained part.
        mismatched: ``(key, checkpoint shape, network shape)`` of same-name tensors with different shapes.
        new: network keys outside the pretrained part (decoder / head trained from scratch, e.g. the
            BasicUNet ``final_conv.*``): expected, never a failure.
        encoder_numel: values in the network's pretrained-part tensors; ``matched_numel``: of those, loaded
            (the share :func:`transfer_weights` checks against ``min_match``).
        notes: extra explanations (e.g. the encoder family does not fit the target).
        shapes: network shape of each missing key, checkpoint shape of each unexpected key.
    """

    target: str
    source: str = ""
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    encoder_numel: int = 0
    matched_numel: int = 0
    notes: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_encoder(self) -> int:
        """Number of pretrained-part tensors in the network (encoder, plus a pretrained decoder)."""
        return len(self.matched) + len(self.missing) + len(self.mismatched)

    @property
    def matched_decoder(self) -> list[str]:
        """The matched keys that belong to a pretrained decoder (BasicUNet ``upcat_*``, SegResNet ``up_*``, UNet
        up blocks)."""
        if self.target not in DOWNSTREAM_KINDS:
            return []
        return [k for k in self.matched if not is_encoder_key(k, self.target)]

    @property
    def share(self) -> float:
        """Loaded share of the network's pretrained-part values (by element count), in [0, 1]."""
        return self.matched_numel / self.encoder_numel if self.encoder_numel else 0.0

    def summary(self) -> str:
        """One line: counts and share."""
        dec = self.matched_decoder or (self.target in DOWNSTREAM_KINDS and decoder_key_prefixes(self.target))
        part = "encoder+decoder" if dec else "encoder"
        return (
            f"{self.target} <- {self.source or 'checkpoint'}: {len(self.matched)}/{self.n_encoder} {part} "
            f"tensors loaded ({100 * self.share:.1f} % of {self.encoder_numel:,} values); "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape mismatches, {len(self.new)} new"
        )

    def table(self, max_rows: int = 20) -> Table:
        """Rich table: one row per problem key (``max_rows`` per kind), the matched count, the new modules."""
        t = Table(title=self.summary(), title_justify="left")
        for col in ("status", "key", "checkpoint shape", "network shape"):
            t.add_column(col)
        for k, a, b in self.mismatched[:max_rows]:
            t.add_row("[red]shape mismatch", k, str(tuple(a)), str(tuple(b)))
        rows = [("[red]missing", self.missing), ("[yellow]unexpected", self.unexpected)]
        for status, keys in rows:
            for k in keys[:max_rows]:
                shape = str(self.shapes.get(k, "?"))
                t.add_row(status, k, *(("-", shape) if "missing" in status else (shape, "-")))
        for status, n in (("shape mismatch", len(self.mismatched)), *((s, len(k)) for s, k in rows)):
            if n > max_rows:
                t.add_row(status.split("]")[-1], f"... and {n - max_rows} more", "", "")
        n_dec = len(self.matched_decoder)
        split = f" ({len(self.matched) - n_dec} encoder, {n_dec} decoder)" if n_dec else ""
        t.add_row("[green]matched", f"{len(self.matched)} tensors{split}", "", "")
        if self.new:
            # top-level module names (MONAI UNet nests everything in ``model``: ``model.2`` is its top up block)
            modules = list(dict.fromkeys(".".join(k.split(".")[: 2 if k.startswith("model.") else 1])
                                         for k in self.new))
            t.add_row("[blue]new (not pretrained)", ", ".join(f"{m}.*" for m in modules),
                      "-", f"{len(self.new)} tensors")
        return t

    def render(self, width: int = 140) -> str:
        """:meth:`table` and the notes as plain text (for error messages and logs)."""
        buf = io.StringIO()
        Console(file=buf, width=width, no_color=True, force_terminal=False).print(self.table())
        return buf.getvalue() + "".join(f"note: {n}\n" for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (counts, share and every key list) for MLflow (``log_dict``)."""
        return {
            "target": self.target,
            "source": self.source,
            "share": self.share,
            "n_matched": len(self.matched),
            "n_matched_decoder": len(self.matched_decoder),
            "n_missing": len(self.missing),
            "n_unexpected": len(self.unexpected),
            "n_mismatched": len(self.mismatched),
            "n_new": len(self.new),
            "matched": list(self.matched),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "new": list(self.new),
            "notes": list(self.notes),
        }


class TransferError(MedsslError):
    """Too few pretrained weights could be loaded; ``report`` holds the :class:`TransferReport`."""

    def __init__(self, message: str, report: TransferReport) -> None:
        super().__init__(message)
        self.report = report
