"""Value checks inside ``torch.compile``: assertions in the graph, not graph breaks.

Eagerly, a value check (non-finite entries, ``log`` outside its domain) raises the typed
error that names the entries. Inside a compiled graph a value cannot steer Python without a
graph break, so the check becomes ``torch._assert_async``: ``fullgraph=True`` traces it, and
the compiled code raises a ``RuntimeError`` that says what failed on a bad input.
"""

from __future__ import annotations

import pytest
import torch

import liegroup
from liegroup.errors import DomainError, NonFiniteError

G = liegroup.Hadamard((4,))


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)]
)
def test_hadamard_log_domain_check_is_a_graph_assertion(backend: str) -> None:
    torch._dynamo.reset()
    log = torch.compile(G.log, backend=backend, fullgraph=True)
    good = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert torch.allclose(log(good), good.log())
    bad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with pytest.raises(DomainError):
        G.log(bad)
    with pytest.raises(RuntimeError, match="value check"):
        log(bad)


def test_finite_check_is_a_graph_assertion() -> None:
    torch._dynamo.reset()
    exp = torch.compile(lambda X: liegroup.SO(3).exp(X), backend="aot_eager", fullgraph=True)
    X = torch.zeros(3, 3, dtype=torch.float64)
    assert torch.equal(exp(X), torch.eye(3, dtype=torch.float64))
    X[0, 1], X[1, 0] = float("nan"), float("-nan")
    with pytest.raises(NonFiniteError):
        liegroup.SO(3).exp(X)
    with pytest.raises(RuntimeError, match="value check"):
        exp(X)
