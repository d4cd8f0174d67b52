import torch

from eep import Clause, ExpertPlacement, Membership, check_validity


def test_valid_instance_reports_ok():
    p = ExpertPlacement.build(2, 8, 4, 3)
    report = check_validity(Membership(4), p)
    assert report.ok and "valid" in report.summary()


def test_failure_before_repair_breaks_routing_and_coverage_naming_layer_expert_rank():
    p = ExpertPlacement.build(1, 8, 4, 2)  # no redundancy: each rank's experts are orphaned by its death
    m = Membership(4)
    m.fail(3)
    report = check_validity(m, p)
    assert not report.ok
    lost = set(p.experts_on_rank(0, 3))
    assert {q.expert for q in report.by_clause(Clause.COVERAGE)} == lost
    routing = report.by_clause(Clause.ROUTING)
    assert routing and all(q.rank == 3 and q.layer == 0 for q in routing)


def test_stale_weights_fail_coverage():
    p = ExpertPlacement.build(1, 4, 2, 2)
    current = torch.ones(1, 4, dtype=torch.bool)
    slot = p.replicas(0, 2)[0]
    current[0, slot] = False
    report = check_validity(Membership(2), p, weights_current=current)
    (problem,) = report.problems
    assert problem.clause is Clause.COVERAGE and problem.expert == 2 and "stale" in problem.message


def test_unreachable_active_pair_is_reported_but_dead_peers_are_not():
    p = ExpertPlacement.build(1, 8, 4, 2)
    reach = torch.ones(4, 4, dtype=torch.bool)
    reach[0, 2] = False
    report = check_validity(Membership(4), p, reachable=reach)
    (problem,) = report.problems
    assert problem.clause is Clause.REACHABILITY and problem.rank == 0 and "rank 2" in problem.message
    p2 = ExpertPlacement.build(1, 8, 4, 3)
    m = Membership(4)
    m.fail(2)
    from eep import repair_coverage
    assert check_validity(m, repair_coverage(p2, m).placement, reachable=reach).ok


def test_inconsistent_tables_are_reported():
    p = ExpertPlacement.build(1, 4, 2, 2)
    p.logical_to_phys[0, 0, 0] = p.replicas(0, 1)[0]
    report = check_validity(Membership(2), p)
    assert any(q.clause is Clause.ROUTING and q.expert == 0 for q in report.problems)
