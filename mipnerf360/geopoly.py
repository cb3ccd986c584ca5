"""Geodesic polyhedra used as projection bases for the IPE (multinerf ``internal/geopoly.py``).

``generate_basis`` returns numpy float64 [K, 3] unit vectors in the same row order as
multinerf (the order fixes the IPE feature order): icosahedron/2 -> 21 rows,
octahedron/1 -> 3 rows. Polyhedron vertex/face tables are the standard ones that multinerf
uses; the row order is checked against tests/golden/geopoly_basis.npz.
"""

from __future__ import annotations

import itertools

import numpy as np


def compute_sq_dist(mat0: np.ndarray, mat1: np.ndarray | None = None) -> np.ndarray:
    """Pairwise squared distances between the columns of mat0 [D, N] and mat1 [D, M]."""
    if mat1 is None:
        mat1 = mat0
    sq0 = np.sum(mat0**2, axis=0)
    sq1 = np.sum(mat1**2, axis=0)
    return np.maximum(0.0, sq0[:, None] + sq1[None, :] - 2 * mat0.T @ mat1)


def compute_tesselation_weights(v: int) -> np.ndarray:
    """Barycentric weights [(v+1)(v+2)/2, 3] of a v-fold subdivided triangle, (i, j, v-i-j)/v."""
    if v < 1:
        raise ValueError(f"angular tesselation must be >= 1, got {v}")
    weights = [(i, j, v - i - j) for i in range(v + 1) for j in range(v + 1 - i)]
    return np.array(weights, dtype=np.float64) / v


def tesselate_geodesic(
    base_verts: np.ndarray, base_faces: np.ndarray, v: int, eps: float = 1e-4
) -> np.ndarray:
    """Subdivide every face v times, project to the unit sphere, drop duplicate vertices.

    Duplicates are merged onto their first occurrence and the survivors keep the order of
    first occurrence.
    """
    tri_weights = compute_tesselation_weights(v)
    verts = np.concatenate([tri_weights @ base_verts[face, :] for face in base_faces], axis=0)
    verts = verts / np.linalg.norm(verts, axis=1, keepdims=True)
    close = compute_sq_dist(verts.T) <= eps
    first = np.argmax(close, axis=1)  # index of the first vertex close to each vertex
    return verts[np.unique(first), :]


def _base_polyhedron(base_shape: str) -> tuple[np.ndarray, np.ndarray]:
    if base_shape == "tetrahedron":
        verts = np.array(
            [
                (np.sqrt(8 / 9), 0, -1 / 3),
                (-np.sqrt(2 / 9), np.sqrt(2 / 3), -1 / 3),
                (-np.sqrt(2 / 9), -np.sqrt(2 / 3), -1 / 3),
                (0, 0, 1),
            ]
        )
        faces = np.array([(0, 1, 2), (0, 2, 3), (0, 1, 3), (1, 2, 3)])
    elif base_shape == "icosahedron":
        a = (np.sqrt(5) + 1) / 2
        verts = np.array(
            [
                (-1, 0, a),
                (1, 0, a),
                (-1, 0, -a),
                (1, 0, -a),
                (0, a, 1),
                (0, a, -1),
                (0, -a, 1),
                (0, -a, -1),
                (a, 1, 0),
                (-a, 1, 0),
                (a, -1, 0),
                (-a, -1, 0),
            ]
        ) / np.sqrt(a + 2)
        faces = np.array(
            [
                (0, 4, 1),
                (0, 9, 4),
                (9, 5, 4),
                (4, 5, 8),
                (4, 8, 1),
                (8, 10, 1),
                (8, 3, 10),
                (5, 3, 8),
                (5, 2, 3),
                (2, 7, 3),
                (7, 10, 3),
                (7, 6, 10),
                (7, 11, 6),
                (11, 0, 6),
                (0, 1, 6),
                (6, 1, 10),
                (9, 0, 11),
                (9, 11, 2),
                (9, 2, 5),
                (7, 2, 11),
            ]
        )
    elif base_shape == "octahedron":
        verts = np.array([(0, 0, -1), (0, 0, 1), (0, -1, 0), (0, 1, 0), (-1, 0, 0), (1, 0, 0)])
        verts = verts.astype(np.float64)
        # One face per octant: the three axis vertices adjacent to each cube corner.
        corners = np.array(list(itertools.product([-1, 1], repeat=3)), dtype=np.float64)
        pairs = np.argwhere(compute_sq_dist(corners.T, verts.T) == 2)
        faces = np.sort(np.reshape(pairs[:, 1], [3, -1]).T, 1)
    else:
        raise ValueError(
            f"unknown base_shape {base_shape!r}; expected 'tetrahedron', 'icosahedron' "
            "or 'octahedron'"
        )
    return verts, faces


def generate_basis(
    base_shape: str,
    angular_tesselation: int,
    remove_symmetries: bool = True,
    eps: float = 1e-4,
) -> np.ndarray:
    """Unit projection directions [K, 3] (float64) from a tesselated polyhedron.

    With remove_symmetries, of each antipodal pair only the vertex that comes first is kept.
    Columns are reversed (z, y, x) as in multinerf.
    """
    verts, faces = _base_polyhedron(base_shape)
    verts = tesselate_geodesic(verts, faces, int(angular_tesselation))
    if remove_symmetries:
        match = compute_sq_dist(verts.T, -verts.T) <= eps
        verts = verts[np.any(np.triu(match), axis=-1), :]
    return np.ascontiguousarray(verts[:, ::-1])
