"""Continuous batching (tandem/engine.py) against Hugging Face's own generate: requests that join a running batch,
leave it early, use different adapters or are cancelled get exactly what each would get alone."""

from __future__ import annotations

import threading

import pytest

from tandem.engine import Completion, Engine

PROMPTS = ["Name a colour.", "Write a poem about the sea.", "What is two plus two?", "Say hello in French.",
           "List three fruits."]


@pytest.fixture(scope="module")
def mixed():
    """The base with two LoRA adapters of random, non-identity weights (a fresh LoRA is the identity)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tandem.config import load_config
    from tandem.models import load_for_inference, load_tokenizer, prepare_base

    cfg = load_config("serve", [])
    base = prepare_base(cfg.model.path, cfg.model.cache_dir, cfg.model.dtype)
    tokenizer = load_tokenizer(base)
    model = get_peft_model(load_for_inference(base.path), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        adapter_name="red")
    model.add_adapter("blue", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for seed, name in enumerate(("red", "blue")):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                torch.nn.init.normal_(module.lora_B[name].weight, std=0.05)
    return model.eval(), tokenizer


def prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def alone(model, tokenizer, text: str, adapter: str | None, max_tokens: int) -> str:
    """Greedy, exactly max_tokens, one request at a time through Hugging Face's generate."""
    import torch

    ids = tokenizer(prompt(tokenizer, text), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class Collector:
    """Gathers one request's events; `reached(n)` waits until it has n tokens."""

    def __init__(self):
        self.events, self.changed = [], threading.Condition()

    def __call__(self, event: dict) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait(self, done, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done(self.events), timeout), self.events[-1:]

    def text(self) -> str:
        return "".join(e.get("text", "") for e in self.events)


def finished(events) -> bool:
    return bool(events) and ("error" in events[-1] or events[-1].get("finish_reason"))


@pytest.mark.parametrize("kernel", ["peft", "gathered"])
def test_rows_that_join_and_leave_get_what_they_would_get_alone(mixed, kernel):
    """With either LoRA kernel: PEFT's mixed batch, or gathered LoRA (stacked adapters, one bmm per layer)."""
    from tandem.gathered_lora import GatheredLoRA

    model, tokenizer = mixed
    gathered = GatheredLoRA(model) if kernel == "gathered" else None
    engine = Engine(lambda: model, tokenizer, max_batch_size=4, max_adapters=2, gathered=lambda: gathered)
    plan = [("red", 12), (None, 6), ("blue", 16), ("red", 9), ("blue", 5)]  # five requests, room for four at once
    runs = [Collector() for _ in plan]
    first = [engine.submit(Completion(prompt(tokenizer, PROMPTS[i]), n, ignore_eos=True), adapter, runs[i])
             for i, (adapter, n) in enumerate(plan[:2])]
    runs[0].wait(lambda events: len(events) >= 3)  # the others join a batch that is already decoding
    for i, (adapter, n) in enumerate(plan[2:], start=2):
        engine.submit(Completion(prompt(tokenizer, PROMPTS[i]), n, ignore_eos=True), adapter, runs[i])
    for run in runs:
        run.wait(finished)
    assert first[0].finish == "length"
    for run, (adapter, n), text in zip(runs, plan, PROMPTS):
        assert run.events[-1]["completion_tokens"] == n and run.events[-1]["finish_reason"] == "length"
        assert run.text() == alone(model, tokenizer, text, adapter, n), (adapter, text)
    stats = engine.stats()
    assert stats["most_rows"] == 4 and stats["most_adapters"] == 3  # red, blue and the base in one forward
    assert stats["running"] == stats["waiting"] == 0


def test_a_cancelled_row_leaves_and_the_rest_go_on(mixed):
    model, tokenizer = mixed
    engine = Engine(lambda: model, tokenizer, max_batch_size=4, max_adapters=2)
    long, short = Collector(), Collector()
    gone = engine.submit(Completion(prompt(tokenizer, PROMPTS[1]), 200, ignore_eos=True), "red", long)
    engine.submit(Completion(prompt(tokenizer, PROMPTS[2]), 20, ignore_eos=True), "blue", short)
    long.wait(lambda events: len(events) >= 2)
    engine.cancel(gone)
    short.wait(finished)
    assert short.text() == alone(model, tokenizer, PROMPTS[2], "blue", 20)
    assert len(long.events) < 200 and engine.stats()["cancelled"] == 1 and not engine.in_use("red")


def test_stop_strings_and_sampling_settings_per_row(mixed):
    model, tokenizer = mixed
    engine = Engine(lambda: model, tokenizer, max_batch_size=4, max_adapters=2)
    reference = alone(model, tokenizer, PROMPTS[1], None, 24)
    stop = reference.split()[2]  # a word the greedy answer reaches
    greedy, sampled = Collector(), Collector()
    engine.submit(Completion(prompt(tokenizer, PROMPTS[1]), 24, stop=(stop,)), None, greedy)
    engine.submit(Completion(prompt(tokenizer, PROMPTS[1]), 24, temperature=1.0, top_p=0.9, ignore_eos=True),
                  None, sampled)
    greedy.wait(finished)
    sampled.wait(finished)
    assert greedy.events[-1]["finish_reason"] == "stop" and greedy.text() == reference[:reference.index(stop)]
    assert sampled.events[-1]["completion_tokens"] == 24


def test_a_failed_forward_fails_its_rows_and_the_engine_goes_on(mixed):
    model, tokenizer = mixed
    failures = [RuntimeError("out of memory")]  # the first forward fails, as a GPU out of memory would

    def pick():
        if failures:
            raise failures.pop()
        return model

    engine = Engine(pick, tokenizer, max_batch_size=4, max_adapters=2)
    failed, after = Collector(), Collector()
    engine.submit(Completion(prompt(tokenizer, PROMPTS[0]), 8, ignore_eos=True), "red", failed)
    failed.wait(finished)
    assert failed.events == [{"error": "generation failed (RuntimeError)"}] and not engine.in_use("red")
    engine.submit(Completion(prompt(tokenizer, PROMPTS[0]), 8, ignore_eos=True), "red", after)
    after.wait(finished)
    assert after.text() == alone(model, tokenizer, PROMPTS[0], "red", 8)


def test_guided_rows_answer_in_their_schema_beside_free_rows(mixed):
    """Rows under a response_format guide produce JSON their schema accepts (a random-weight adapter included, which
    left alone writes no JSON at all), while an unguided row in the same batch still gets what it gets alone."""
    import json

    from tandem.structured import Guides, SchemaError, response_regex

    model, tokenizer = mixed
    engine = Engine(lambda: model, tokenizer, max_batch_size=4, max_adapters=2)
    guides = Guides(tokenizer)
    import torch

    torch.manual_seed(0)  # the sampled row's draws
    # passage numbers as the grounded prompt has them: an unbounded integer could run a sampled row past max_tokens
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40},
                                               "sources": {"type": "array", "items": {"enum": [1, 2, 3]},
                                                           "maxItems": 3}},
              "required": ["answer", "sources"]}
    regex = response_regex({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    runs = {who: Collector() for who in ("base", "red", "sampled", "free")}
    for who, adapter, temperature in (("base", None, 0.0), ("red", "red", 0.0), ("sampled", "blue", 1.0)):
        engine.submit(Completion(prompt(tokenizer, "Who wrote Hamlet? Answer in JSON."), 96, temperature=temperature,
                                 guide=guides.guide(regex)), adapter, runs[who])
    engine.submit(Completion(prompt(tokenizer, PROMPTS[2]), 12, ignore_eos=True), None, runs["free"])
    for run in runs.values():
        run.wait(finished)
    for who in ("base", "red", "sampled"):
        answer = json.loads(runs[who].text())  # valid JSON, ended by the guide's final state
        assert runs[who].events[-1]["finish_reason"] == "stop", who
        assert set(answer) == {"answer", "sources"} and isinstance(answer["answer"], str), who
        assert set(answer["sources"]) <= {1, 2, 3} and len(answer["sources"]) <= 3, who
    assert runs["free"].text() == alone(model, tokenizer, PROMPTS[2], None, 12)
    assert json.loads(runs["base"].text()) is not None
    assert response_regex({"type": "text"}) is None and response_regex({"type": "json_object"})
    with pytest.raises(SchemaError, match="json_schema.schema must be"):
        response_regex({"type": "json_schema", "json_schema": {"name": "x"}})


def test_calibrated_abstention_steers_the_engine_as_it_steers_evaluation(mixed):
    """An adapter's abstention threshold steers a row to the abstention reply wherever the model gives the reply's
    next token that probability: the app's engine and the evaluation's generate agree, under the answer's guide; a
    threshold above what the model gives changes nothing. (Under the guide, these random adapters gave each of the
    reply's tokens 0.07 or more, and write `{ "answer": ...` when left alone.)"""
    from tandem.abstention import Abstention, abstention_tokens
    from tandem.generation import generate_replies
    from tandem.prompts import answer_format, rag_answer, rag_messages
    from tandem.structured import Guides, response_regex

    model, tokenizer = mixed
    guides, reply = Guides(tokenizer), abstention_tokens(tokenizer)
    regex = response_regex(answer_format(1))
    conversation = rag_messages("Who wrote Hamlet?", ["Hamlet is a tragedy by William Shakespeare."])
    model.set_adapter("red")

    def offline(threshold):
        return generate_replies(model, tokenizer, [conversation], 24, 1, [guides.guide(regex)],
                                [Abstention(reply, threshold)])[0]

    greedy = offline(None)
    assert 0.1 < greedy.abstain_score < 0.5 and "Shakespeare" in greedy.text
    assert offline(greedy.abstain_score + 0.01).text == greedy.text
    engine = Engine(lambda: model, tokenizer, max_batch_size=2, max_adapters=2)
    served = Collector()
    engine.submit(Completion(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                             24, guide=guides.guide(regex), abstention=Abstention(reply, 0.01)), "red", served)
    served.wait(finished)
    assert served.text() == offline(0.01).text == rag_answer("", [])


def test_gathered_lora_matches_pefts_mixed_batch(mixed):
    """One batched matmul per layer over stacked adapters gives PEFT's mixed-batch logits: rows of two adapters, the
    base, and a third adapter of another rank on another layer set (zero-padded in the stacks)."""
    import torch
    from peft import LoraConfig

    from tandem.gathered_lora import GatheredLoRA

    model, tokenizer = mixed
    model.add_adapter("green", LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj"], task_type="CAUSAL_LM"))
    try:
        torch.manual_seed(2)
        for module in model.modules():
            if hasattr(module, "lora_B") and "green" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["green"].weight, std=0.05)
        assert GatheredLoRA.supports(model)
        gathered = GatheredLoRA(model)
        tokenizer.padding_side = "left"
        batch = tokenizer([prompt(tokenizer, p) for p in PROMPTS[:4]], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        adapters = ["red", None, "blue", "green"]
        with torch.no_grad():
            expected = model(**batch, adapter_names=[a or "__base__" for a in adapters]).logits
            with gathered.rows(adapters):
                got = model(**batch).logits
            with model.disable_adapter():
                base = model(**batch).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert (expected[0] - base[0]).abs().max() > 0.1 and (expected[3] - base[3]).abs().max() > 0.1
        torch.testing.assert_close(got[1], base[1])  # the base row is the base
    finally:
        model.delete_adapter("green")
