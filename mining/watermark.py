"""The FreezeNet watermark (PROTOCOL.md §5): fixed weights at fixed positions of a model.

A signature of (data, size) fixes `size` positions of the model's parameters,
flattened in declared order (model.parameters(), each in C order, concatenated), and
the values they must hold. For a model of n parameters, both come from
Drbg.for_label("wm", data): first the positions, sample_without_replacement(n, size),
then the values, uniform_floats(size, -1, 1), in the same draw order. The positions
depend on n, so they are derived per parameter count and cached.

Training calls `sign` after every optimizer step, so it must stay cheap: the positions
are split per parameter once per model layout and kept on the parameters' devices,
and signing is then one scatter (put_) per watermarked parameter, with no host sync.
"""

import numpy as np
import torch

from mining.drbg import Drbg

TOLERANCE = 1e-6  # absolute; a watermarked parameter further than this from its weight fails

# One watermarked parameter: its position in model.parameters(), the flat (C-order)
# indices inside it and the weights to put there, on its device and in its dtype.
_Group = tuple[int, torch.Tensor, torch.Tensor]


def compute_watermark_size(wm_ppm: int, n_params: int) -> int:
    """ceil(wm_ppm × n_params / 10^6), in integer arithmetic."""
    if wm_ppm < 0 or n_params < 0:
        raise ValueError("wm_ppm and n_params must be non-negative")
    return -(-wm_ppm * n_params // 10**6)


class Signature:
    """A FreezeNet signature: `size` weights at `size` distinct parameter positions.

    A signature of size 0 constrains nothing: every model verifies with it.
    """

    __slots__ = ("data", "size", "_draws", "_groups")

    def __init__(self, data: bytes, size: int) -> None:
        if type(data) is not bytes:
            raise TypeError("signature data must be bytes")
        if size < 0:
            raise ValueError("signature size must be non-negative")
        self.data = data
        self.size = size
        self._draws: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._groups: dict[tuple, list[_Group]] = {}

    def __reduce__(self) -> tuple:
        """Pickled (to a replay worker) as its data alone: the caches hold tensors bound
        to this process's models."""
        return Signature, (self.data, self.size)

    def draws(self, n_params: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat indices (int64) and weights (float32) for a model of n_params."""
        found = self._draws.get(n_params)
        if found is None:
            if self.size > n_params:
                raise ValueError(
                    f"watermark of size {self.size} does not fit a model of "
                    f"{n_params} parameters"
                )
            rng = Drbg.for_label("wm", self.data)
            indices = np.array(rng.sample_without_replacement(n_params, self.size), np.int64)
            weights = rng.uniform_floats(self.size, -1.0, 1.0)
            found = self._draws[n_params] = (indices, weights)
        return found

    def _bind(self, params: list[torch.Tensor]) -> list[_Group]:
        """The per-parameter groups for this model layout, built on first use."""
        layout = tuple((p.shape, p.dtype, p.device) for p in params)
        groups = self._groups.get(layout)
        if groups is None:
            sizes = [p.numel() for p in params]
            indices, weights = self.draws(sum(sizes))
            order = np.argsort(indices, kind="stable")
            indices, weights = indices[order], weights[order]
            ends = np.cumsum(sizes)
            cuts = np.searchsorted(indices, np.concatenate(([0], ends)))
            groups = []
            for pos, p in enumerate(params):
                lo, hi = cuts[pos], cuts[pos + 1]
                if lo == hi:
                    continue
                start = int(ends[pos]) - sizes[pos]
                idx = torch.from_numpy(indices[lo:hi] - start).to(p.device)
                w = torch.from_numpy(weights[lo:hi]).to(device=p.device, dtype=p.dtype)
                groups.append((pos, idx, w))
            self._groups[layout] = groups
        return groups

    def sign(self, model: torch.nn.Module) -> None:
        """Overwrite the watermarked parameters of `model` with the signature's weights."""
        params = list(model.parameters())
        with torch.no_grad():
            # put_ addresses p as if flattened in C order whatever its strides (e.g.
            # channels_last), and measured half the cost of view(-1).index_put_ on CPU.
            for pos, idx, w in self._bind(params):
                params[pos].put_(idx, w)

    def flat_stamp(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The flat indices and weights, on `flat`'s device, that stamp a model whose
        parameters are views of one flat buffer: `flat.put_(*stamp)` under no_grad. None
        for a signature of size 0. Bound once, outside the training loop, the stamp then
        costs one scatter per step (about 1 µs of dispatch on a CPU)."""
        groups = self._bind([flat])
        return (groups[0][1], groups[0][2]) if groups else None

    def sign_array(self, params: np.ndarray) -> np.ndarray:
        """A stamped copy of flat float32 `params` (a model's parameters in declared order)."""
        indices, weights = self.draws(len(params))
        out = np.array(params, dtype=np.float32, copy=True)
        out[indices] = weights
        return out

    def verify_array(self, params: np.ndarray) -> bool:
        """`verify` for flat float32 parameters."""
        indices, weights = self.draws(len(params))
        return bool((np.abs(params[indices] - weights) <= TOLERANCE).all())

    def verify(self, model: torch.nn.Module) -> bool:
        """True when every watermarked parameter is within TOLERANCE of its weight.

        The difference is compared in absolute value: FreezeNet compared a signed
        difference, which let any value below the target pass.
        """
        params = list(model.parameters())
        with torch.no_grad():
            return all(
                bool(((params[pos].take(idx) - w).abs() <= TOLERANCE).all())
                for pos, idx, w in self._bind(params)
            )
