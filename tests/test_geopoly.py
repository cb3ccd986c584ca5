"""geopoly.generate_basis against multinerf's golden bases (exact row order)."""

from pathlib import Path

import numpy as np
import pytest

from mipnerf360 import geopoly

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize(
    "shape,subdiv,key",
    [("icosahedron", 2, "out_icosahedron_2"), ("octahedron", 1, "out_octahedron_1")],
)
def test_generate_basis_matches_golden(shape, subdiv, key):
    ref = np.load(GOLDEN / "geopoly_basis.npz")[key]
    basis = geopoly.generate_basis(shape, subdiv)
    assert basis.dtype == np.float64
    assert basis.shape == ref.shape
    np.testing.assert_allclose(basis, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", ["tetrahedron", "icosahedron", "octahedron"])
@pytest.mark.parametrize("subdiv", [1, 2, 3])
def test_basis_is_unit_and_free_of_antipodes(shape, subdiv):
    basis = geopoly.generate_basis(shape, subdiv)
    np.testing.assert_allclose(np.linalg.norm(basis, axis=1), 1.0, atol=1e-12)
    # no duplicated and no antipodal pair left
    dots = basis @ basis.T
    off = dots[~np.eye(len(basis), dtype=bool)]
    assert np.all(np.abs(off) < 1 - 1e-6)


def test_without_symmetry_removal_keeps_all_vertices():
    # icosahedron subdivided twice has 10*4+2 = 42 distinct vertices on the sphere
    full = geopoly.generate_basis("icosahedron", 2, remove_symmetries=False)
    assert full.shape == (42, 3)
    half = geopoly.generate_basis("icosahedron", 2)
    assert half.shape == (21, 3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="base_shape"):
        geopoly.generate_basis("cube", 1)
    with pytest.raises(ValueError, match="tesselation"):
        geopoly.generate_basis("icosahedron", 0)
