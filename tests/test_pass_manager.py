"""The pass manager: pipeline specs, option errors, -O levels on a ResNet, disabling passes,
IR dumps, and errors raised inside a pass naming the pass and the node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import hbc
from hbc.errors import InputError
from hbc.ir import from_text
from hbc.ir.graph import Graph
from hbc.models.common import seeded_init
from hbc.models.resnet import resnet18
from hbc.passes import PASSES, PIPELINES, Pass, PassContext, PassError, parse_pipeline, run
from hbc.passes.manager import build
from tests.passes_util import assert_same_numerics

SMALL = """hbir 1
graph @small(%x: f32[2,3]) {
  %c: f32[3] = const [1.0, 2.0, 3.0]
  %k: f32[3] = const [1.0, 1.0, 1.0]
  %s: f32[3] = add(%c, %k)
  %i: f32[2,3] = identity(%x)
  %y: f32[2,3] = mul(%i, %s) loc("model.py:7")
  %dead: f32[2,3] = relu(%x)
  return %y
}
"""


@pytest.fixture
def small() -> Graph:
    return from_text(SMALL)


@pytest.fixture(scope="module")
def resnet() -> Graph:
    model = seeded_init(resnet18(num_classes=10))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return hbc.load((model, (x,)))


def _missing(pipeline: list[str]) -> list[str]:
    build("dce")  # imports every pass module
    return [name for name in pipeline if name not in PASSES]


# -- pipeline specs ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("dce", [("dce", {})]),
    (" const-fold , dce ", [("const-fold", {}), ("dce", {})]),
    ("fold-bn{scope=backbone.*|neck.*},fuse",
     [("fold-bn", {"scope": "backbone.*|neck.*"}), ("fuse", {})]),
    ("a{k=v k2=w},b{},c", [("a", {"k": "v", "k2": "w"}), ("b", {}), ("c", {})]),
    ("const-fold{max_elements=10}", [("const-fold", {"max_elements": "10"})]),
])
def test_parse_pipeline(text, expected):
    assert parse_pipeline(text) == expected


@pytest.mark.parametrize("text, message", [
    ("a{k}", "not key=value"),
    ("a{=v}", "not key=value"),
    ("a b", "expected ','"),
    ("a,,b", "bad pass spec"),
    ("a{k=v", "expected ','"),
    ("{k=v}", "bad pass spec"),
    ("a;b", "expected ','"),
])
def test_parse_pipeline_rejects_malformed_specs(text, message):
    with pytest.raises(InputError, match=message):
        parse_pipeline(text)


def test_unknown_pass_lists_the_known_ones(small):
    with pytest.raises(InputError, match=r"unknown pass 'no-such-pass' \(passes: .*const-fold"):
        run(small, passes="const-fold,no-such-pass")


def test_unknown_option(small):
    with pytest.raises(InputError, match=r"pass 'const-fold' has no option\(s\) bogus "
                                         r"\(options: max_elements\)"):
        run(small, passes="const-fold{bogus=1}")
    with pytest.raises(InputError, match=r"pass 'dce' has no option\(s\) x \(options: none\)"):
        run(small, passes=[("dce", {"x": "1"})])


def test_bad_option_value(small):
    with pytest.raises(InputError, match=r"const-fold': option 'max_elements' expects int, "
                                         r"got 'many'"):
        run(small, passes="const-fold{max_elements=many}")


def test_options_reach_the_pass_and_its_repr():
    p = build("const-fold{max_elements=7}")
    assert p.opts["max_elements"] == 7 and repr(p) == "const-fold{max_elements=7}"
    assert repr(build("const-fold")) == "const-fold"


def test_opt_or_passes_exactly_one(small):
    with pytest.raises(InputError, match="either opt= or passes="):
        run(small)
    with pytest.raises(InputError, match="either opt= or passes="):
        run(small, opt=1, passes="dce")
    with pytest.raises(InputError, match="--opt 7"):
        run(small, opt=7)


# -- opt levels --------------------------------------------------------------------------------

def test_every_pipeline_pass_declares_its_level():
    build("dce")
    for level, names in PIPELINES.items():
        for name in names:
            if name in PASSES:
                assert PASSES[name].opt_level <= level, f"{name} is in O{level}"


@pytest.mark.parametrize("opt", [0, 1, 2, 3])
def test_opt_levels_keep_resnet_numerics(resnet, opt):
    missing = _missing(PIPELINES[opt])
    if missing:
        pytest.skip(f"O{opt} needs pass(es) not registered yet: {', '.join(missing)}")
    dumps: list[str] = []
    out = run(resnet, opt=opt, dump_after="all", dump=lambda name, text: dumps.append(name))
    assert dumps == [repr(build(n)) for n in PIPELINES[opt]]
    assert_same_numerics(resnet, out, seeds=(0,))
    assert [v.name for v in out.outputs] == [v.name for v in resnet.outputs]
    if opt >= 2:  # BN folded away
        assert not any(n.op == "batch_norm" for n in out.nodes)
    assert len(resnet.nodes) == 69  # run() worked on a copy


def test_o1_on_a_small_graph(small):
    out = run(small, opt=1)
    assert [n.op for n in out.nodes] == ["mul"]
    assert_same_numerics(small, out)


# -- disable, dumps ----------------------------------------------------------------------------

def test_disable_drops_a_pass(small):
    dumps: list[str] = []
    out = run(small, opt=1, disable=["remove-noops"], dump_after="all",
              dump=lambda name, text: dumps.append(name))
    assert dumps == ["absorb-qdq", "const-fold", "dce"]
    assert [n.op for n in out.nodes] == ["identity", "mul"]
    with pytest.raises(InputError, match="--disable names unknown pass.*nope"):
        run(small, opt=1, disable=["nope"])


def test_dump_after_all_and_one(small):
    dumps: list[tuple[str, str]] = []
    run(small, passes="const-fold,remove-noops,dce", dump_after="all",
        dump=lambda name, text: dumps.append((name, text)))
    assert [name for name, _ in dumps] == ["const-fold", "remove-noops", "dce"]
    assert "add(" not in dumps[0][1] and "identity(" in dumps[0][1]
    assert "identity(" not in dumps[1][1] and "relu(" in dumps[1][1]
    assert "relu(" not in dumps[2][1]
    one: list[str] = []
    run(small, passes="const-fold,remove-noops,dce", dump_after="remove-noops",
        dump=lambda name, text: one.append(text))
    assert one == [dumps[1][1]]


def test_dump_after_a_pass_not_in_the_pipeline(small):
    with pytest.raises(InputError, match=r"--dump-after cse: no such pass in the pipeline "
                                         r"\(absorb-qdq, const-fold, remove-noops, dce\)"):
        run(small, opt=1, dump_after="cse")


def test_context_collects_explanations(small):
    ctx = PassContext()
    run(small, passes="const-fold{max_elements=2}", context=ctx)
    assert [str(e) for e in ctx.explanations] == [
        "[const-fold] s: result has 3 elements, more than the folding limit of 2 "
        "(option max_elements)"]


# -- errors inside passes ----------------------------------------------------------------------

class _Explode(Pass):
    """Test-only: raises a plain Python error while visiting the mul node."""

    name = "test-manager-explode"

    def run(self, graph: Graph) -> bool:
        for node in self.walk(graph):
            if node.op == "mul":
                raise ZeroDivisionError("boom")
        return False


class _Corrupt(Pass):
    """Test-only: leaves a broken graph behind (a node's recorded type is wrong)."""

    name = "test-manager-corrupt"

    def run(self, graph: Graph) -> bool:
        node = graph.node("y")
        node.outputs[0].type = node.outputs[0].type.with_(shape=(3, 2))
        return True


@pytest.fixture
def test_passes() -> Iterator[None]:
    build("dce")
    for cls in (_Explode, _Corrupt):
        PASSES[cls.name] = cls
    try:
        yield
    finally:
        for cls in (_Explode, _Corrupt):
            PASSES.pop(cls.name, None)


def test_exception_in_a_pass_names_pass_and_node(small, test_passes):
    with pytest.raises(PassError, match=r"pass 'test-manager-explode' failed at mul node "
                                        r"'y \(model.py:7\)': ZeroDivisionError: boom") as e:
        run(small, passes="dce,test-manager-explode")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_invalid_graph_after_a_pass_is_caught(small, test_passes):
    with pytest.raises(PassError, match=r"pass 'test-manager-corrupt' left an invalid graph: "
                                        r".*'y \(model.py:7\)'.*f32\[3, 2\]"):
        run(small, passes="test-manager-corrupt")
    run(small, passes="test-manager-corrupt", verify=False)  # the check is what catches it


def test_test_passes_are_gone_afterwards():
    build("dce")
    assert not any(name.startswith("test-manager-") for name in PASSES)


@pytest.mark.parametrize("spec", ["dce,", "dce{a=1 a=2}"])
def test_pipeline_spec_rejects_trailing_comma_and_repeated_options(spec):
    from hbc.errors import InputError
    from hbc.passes import parse_pipeline

    with pytest.raises(InputError):
        parse_pipeline(spec)
