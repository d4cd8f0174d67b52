"""Checks of a finished run against the single-process reference."""

from __future__ import annotations

from eep.runtime.config import RuntimeConfig
from eep.runtime.model import generate_weights, make_request, next_token_table, reference_generate
from eep.state import ExpertPlacement, Membership, check_validity


def check_run(cfg: RuntimeConfig, result) -> list[str]:
    """Problems with ``result`` (a ``RunResult``); empty when every check passed.

    Checks: every request answered or refused with an error (none lost); each answer equals the
    reference token by token (answers are written once through compare-and-set, so none is
    answered twice); no answer was published under an epoch whose maps are not EP-valid; and no
    commit declared an epoch fit to serve whose maps are not EP-valid (an epoch that lost coverage
    is committed as one that serves nothing, and may be the last one when requests were refused).
    """
    problems = []
    missing = sorted(set(range(cfg.num_requests)) - set(result.results) - set(result.refused))
    if missing:
        problems.append(f"{len(missing)} requests neither answered nor refused, e.g. {missing[:8]}")
    weights = generate_weights(cfg.model, shard_dir=cfg.shard_dir)
    table = next_token_table(weights)
    wrong = []
    for q, tokens in sorted(result.results.items()):
        prompt, num_new = make_request(cfg.model, q, max_new_tokens=cfg.max_new_tokens)
        expected = reference_generate(weights, prompt, num_new, table=table)
        if tokens != expected:
            pos = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            wrong.append(f"request {q} (served by rank {result.served_by[q][0]}): token {pos} is "
                         f"{tokens[pos] if pos < len(tokens) else None}, reference {expected[pos] if pos < len(expected) else None}")
    if wrong:
        problems.append(f"{len(wrong)} answers differ from the reference: " + "; ".join(wrong[:3]))
    commits = [d for d in result.decisions if d["kind"] == "commit"]
    if not commits:
        problems.append("no membership was ever committed")
    valid = {}
    for d in commits:
        report = check_validity(Membership(cfg.num_ranks, active=d["active"], epoch=d["epoch"]),
                                ExpertPlacement.from_dict(d["placement"]))
        valid[d["epoch"]] = report.ok
        if not report.ok and d.get("plan", {}).get("valid", True):
            problems.append(f"epoch {d['epoch']} was committed to serve but " + report.summary())
    from_invalid = sorted(q for q, (_, _, epoch) in result.served_by.items() if not valid.get(epoch, False))
    if from_invalid:
        problems.append(f"{len(from_invalid)} answers were published under an epoch that is not EP-valid, "
                        f"e.g. requests {from_invalid[:8]}")
    return problems


def refusal_summary(result) -> dict:
    """How many requests were refused and the distinct reasons (each names the uncovered experts)."""
    reasons = sorted(set(result.refused.values()))
    return {"refused": len(result.refused), "reasons": reasons}
