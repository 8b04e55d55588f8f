"""dp_accounting's epsilon computed here, independently of fedrun.fl.privacy: the reference the
privacy tests hold fedrun's accountant against."""


def library_epsilon(q, sigma, rounds, delta, fixed=None):
    """dp_accounting's epsilon, built here independently of fedrun.privacy. The noise std is
    sigma * clip; dp_accounting's noise multiplier is that std over the L2 sensitivity of the sum
    under the event's adjacency: clip for add/remove-one (Poisson), 2 * clip for replace-one
    (fixed-size cohorts: one clipped update swapped for another)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if fixed is None:
        accountant = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    else:
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            *fixed, dp_accounting.GaussianDpEvent(sigma / 2))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)
