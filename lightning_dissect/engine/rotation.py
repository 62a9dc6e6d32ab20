"""Basis changes of a layer: Haar-random rotations and their fractional powers (SEMANTICS §6)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def random_rotation(num_units: int, seed: int) -> torch.Tensor:
    """A Haar-random rotation `R` in SO(K), float64.

    QR of a standard Gaussian matrix drawn from a generator seeded with `seed`,
    with the signs of `Q`'s columns fixed by `diag(R)` (which makes `Q` Haar
    distributed in O(K)), then the first column negated if the determinant is
    -1, so the result is a rotation.
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(num_units, num_units, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def fractional_power(rotation: torch.Tensor, alpha: float) -> torch.Tensor:
    """`R^alpha` for a rotation `R`, through its real Schur form.

    An orthogonal matrix is normal, so its real Schur form is block diagonal:
    2x2 rotations by angles `theta` in `(-pi, pi]` and 1x1 blocks of +-1.
    `R^alpha` scales every angle by `alpha` (a pair of -1 eigenvalues is a
    rotation by `pi`). The eigendecomposition `R = V diag(e^{i theta}) V^-1`
    carries the same blocks (each conjugate pair of eigenvectors spans one
    block's plane), so `R^alpha = Re(V diag(e^{i alpha theta}) V^-1)`.
    `alpha = 0` returns the identity and `alpha = 1` returns `R` exactly.

    Raises:
        ValueError: if `rotation` is not square and orthogonal with determinant +1.
    """
    rotation = rotation.double()
    k = rotation.shape[0]
    if rotation.ndim != 2 or rotation.shape[1] != k:
        raise ValueError(f"rotation must be a square matrix, got shape {tuple(rotation.shape)}")
    if not torch.allclose(rotation @ rotation.T, torch.eye(k, dtype=torch.float64), atol=1e-8):
        raise ValueError("rotation must be orthogonal (R @ R.T == I)")
    if alpha == 0:
        return torch.eye(k, dtype=torch.float64)
    if alpha == 1:
        return rotation.clone()
    eigenvalues, vectors = torch.linalg.eig(rotation)
    inverse = torch.linalg.inv(vectors)
    angles = torch.angle(eigenvalues)
    # R^alpha = sum_i lambda_i^alpha v_i w_i^T over the eigenpairs (w_i the rows of V^-1) ...
    flipped = angles.abs() > torch.pi - 1e-7
    powered = torch.polar(torch.ones_like(angles), alpha * angles) * (~flipped)
    result = ((vectors * powered.unsqueeze(0)) @ inverse).real
    if flipped.any():
        # ... except on the -1 eigenspace, where the eigenvectors need not come in conjugate
        # pairs: take a real orthonormal basis of it and rotate each pair of basis vectors by pi.
        projector = ((vectors[:, flipped]) @ inverse[flipped]).real
        dimension = int(flipped.sum())
        if dimension % 2:
            raise ValueError("rotation has determinant -1; a basis change must be a proper rotation")
        basis = torch.linalg.eigh((projector + projector.T) / 2).eigenvectors[:, -dimension:]
        first, second = basis[:, 0::2], basis[:, 1::2]
        cos, sin = math.cos(alpha * math.pi), math.sin(alpha * math.pi)
        result = result + cos * (first @ first.T + second @ second.T) + sin * (second @ first.T - first @ second.T)
    return result.contiguous()


@dataclass(frozen=True)
class Rotation:
    """A basis change for `dissect`: `seed` and `alpha`, or an explicit `matrix`.

    Args:
        seed: seed of the Haar-random rotation `R` (SEMANTICS §6).
        alpha: the power of `R` applied, 0 (identity) to 1 (`R`).
        matrix: an explicit `K x K` matrix applied as is, instead of `R^alpha`.
    """

    seed: int | None = 0
    alpha: float = 1.0
    matrix: torch.Tensor | None = None

    def resolve(self, num_units: int) -> torch.Tensor:
        """The float64 `K x K` matrix to apply to a layer of `num_units` units."""
        if self.matrix is not None:
            matrix = torch.as_tensor(self.matrix, dtype=torch.float64)
            if tuple(matrix.shape) != (num_units, num_units):
                raise ValueError(
                    f"rotation matrix has shape {tuple(matrix.shape)}, the layer has {num_units} units"
                )
            return matrix
        return fractional_power(random_rotation(num_units, int(self.seed or 0)), float(self.alpha))

    def describe(self) -> dict[str, Any]:
        """The rotation as recorded in a dissection's settings (JSON-ready)."""
        if self.matrix is not None:
            return {"matrix": torch.as_tensor(self.matrix, dtype=torch.float64).tolist()}
        return {"seed": self.seed, "alpha": self.alpha}


def as_rotation(rotation: Rotation | Mapping[str, Any] | torch.Tensor | None) -> Rotation | None:
    """The `rotation=` option of `dissect` as a `Rotation` (None: no basis change).

    Accepts a `Rotation`, `dict(seed=, alpha=)` or `dict(matrix=)`, or an explicit `K x K` tensor.

    Raises:
        ValueError: anything else, or a dict with other keys.
    """
    if rotation is None or isinstance(rotation, Rotation):
        return rotation
    if isinstance(rotation, torch.Tensor):
        return Rotation(matrix=rotation)
    if isinstance(rotation, Mapping):
        unknown = set(rotation) - {"seed", "alpha", "matrix"}
        if unknown:
            raise ValueError(f"rotation has unknown keys {sorted(unknown)}; use seed, alpha or matrix")
        return Rotation(**rotation)
    raise ValueError(f"rotation={rotation!r} must be None, a Rotation, a dict(seed=, alpha=) or a K x K tensor")


def rotate_units(activations: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """New unit `i` is `sum_j matrix[i, j] * A[:, j]`, computed in float64, returned as float32.

    Args:
        activations: `(N, K, h, w)`.
        matrix: `(K, K)`.
    """
    n, k, h, w = activations.shape
    flat = activations.double().permute(1, 0, 2, 3).reshape(k, -1)
    rotated = matrix.to(device=activations.device, dtype=torch.float64) @ flat
    return rotated.reshape(k, n, h, w).permute(1, 0, 2, 3).float().contiguous()
