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
    return problems + check_commits(cfg, result)


def check_commits(cfg: RuntimeConfig, result) -> list[str]:
    """Problems with the committed epochs: none committed; one declared fit to serve whose maps are
    not EP-valid (``eep.check_validity``); an answer published under an epoch that is not EP-valid."""
    problems = []
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


def check_faults_fired(faults: list, num_answered: int) -> list[str]:
    """Problems for faults (``eep.runtime.control.launcher.Fault``) that never reached their rank:
    the run ended before the trigger, or the rank had already exited when it fired."""
    problems = []
    for f in faults:
        when = f"at {f.at_results} answers" if f.at_results is not None else "as scheduled"
        if f.fired_at is None:
            problems.append(f"fault {f.action} rank {f.rank} {when} never fired: the run ended first "
                            f"({num_answered} requests answered)")
        elif f.is_skipped:
            problems.append(f"fault {f.action} rank {f.rank} {when} was not sent: the rank had already exited")
    return problems


def transitions_of(cfg: RuntimeConfig, results: dict[int, list[int]]) -> tuple[dict, dict]:
    """Each token's successors seen in the answers, and the requests that passed through it. The
    benchmark model has no attention state, so a correct engine maps a token to one successor."""
    transitions: dict[int, set[int]] = {}
    owners: dict[int, set[int]] = {}
    for q, tokens in results.items():
        prompt, _ = make_request(cfg.model, q, max_new_tokens=cfg.max_new_tokens)
        for a, b in zip([prompt] + tokens, tokens):
            transitions.setdefault(a, set()).add(b)
            owners.setdefault(a, set()).add(q)
    return transitions, owners
