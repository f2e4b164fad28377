import pytest

from dgopt.errors import IRError
from dgopt.ir import Graph, graph_from_dict, graph_to_dict, verify
from dgopt.spec import spec_from_dict
from dgopt.strategies import expand

from conftest import tiny_spec


def sampler_graph():
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    t = g.add("temperature", [x], {"value": 0.7})
    s = g.add("softmax", [t])
    u = g.add("input", attrs={"name": "uniform", "type": "uniform"}, id="uniform")
    g.set_output("next_token", g.add("multinomial", [s, u]))
    return g


def test_expand_autoregressive_greedy_is_textbook_step():
    g = expand(spec_from_dict(tiny_spec()))
    verify(g)
    assert g.ops() == ["input", "input", "input", "input", "forward", "last_position", "softmax", "argmax"]
    assert set(g.outputs) == {"next_token", "present"}


def test_expand_sampling_orders_processors_like_hf():
    spec = spec_from_dict(tiny_spec(sampling={"kind": "sample", "temperature": 0.5, "top_k": 5, "top_p": 0.9,
                                              "min_p": 0.1, "repetition_penalty": 1.3}))
    ops = [o for o in expand(spec).ops() if o not in ("input",)]
    assert ops == ["forward", "last_position", "repetition_penalty", "temperature", "top_k", "top_p", "min_p",
                   "softmax", "multinomial"]


def test_print_parse_round_trip_keeps_fingerprint():
    for g in (sampler_graph(), expand(spec_from_dict(tiny_spec(sampling={"kind": "sample", "top_k": 3})))):
        g2 = graph_from_dict(graph_to_dict(g))
        assert g2.fingerprint() == g.fingerprint()
        assert graph_to_dict(g2) == graph_to_dict(g)


def test_fingerprint_sees_attribute_changes():
    g = sampler_graph()
    g2 = g.copy()
    g2.node("temperature").attrs["value"] = 0.8
    assert g.fingerprint() != g2.fingerprint()


def test_copy_is_independent():
    g = sampler_graph()
    g2 = g.copy()
    g2.set_input("multinomial", 0, g2.node("softmax").inputs[0].node)  # breaks types in the copy only
    verify(g)
    with pytest.raises(IRError, match="expects probs"):
        verify(g2)


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g.node("temperature").attrs.update(value=-1.0), "must be > 0"),
    (lambda g: g.node("temperature").attrs.update(bogus=1), "unknown attribute"),
    (lambda g: setattr(g, "outputs", {}), "no outputs"),
    (lambda g: g.set_input("multinomial", 1, "logits"), "expects uniform"),
])
def test_verifier_rules_catch_bad_graphs(mutate, message):
    g = sampler_graph()
    mutate(g)
    with pytest.raises(IRError, match=message):
        verify(g)


def test_dynamic_length_needs_one_guess():
    """verify_greedy length -1 reads K off one candidate's shape: with several guesses it would be lowered as one."""
    from dgopt.ir import Graph
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits_seq"}, id="x")
    c = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="c")
    v = g.add("verify_greedy", [x, c], {"guesses": 1, "length": -1}, id="v")
    g.set_output("accept_len", v.out("accept_len"))
    verify(g)
    g.node("v").attrs.update(guesses=3)
    with pytest.raises(IRError, match="length -1 needs guesses 1, got 3"):
        verify(g)


def test_add_rejects_unknown_op_and_bad_refs():
    g = Graph()
    with pytest.raises(IRError, match="unknown op"):
        g.add("softermax")
    with pytest.raises(IRError, match="unknown node"):
        g.add("softmax", ["nope"])


def test_replace_all_uses_and_remove():
    g = sampler_graph()
    t = g.node("temperature")
    assert g.replace_all_uses(t.out(), g.node("logits").out()) == 1
    assert g.users(t.id) == []
    g.remove(t.id)
    verify(g)
    with pytest.raises(IRError, match="still has uses"):
        g.remove("softmax")
