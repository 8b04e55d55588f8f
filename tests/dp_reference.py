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


def library_pld_epsilon(q, sigma, rounds, delta):
    """dp_accounting's PLDAccountant for ``rounds`` Poisson-sampled Gaussian rounds (add/remove-one,
    noise multiplier sigma), built here independently of fedrun.fl.privacy."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
    return accountant.get_epsilon(delta)


def pld_by_hand(q, sigma, rounds, delta):
    """The same guarantee from the privacy loss distribution itself, without an accountant: the
    subsampled Gaussian's PLD, self-composed ``rounds`` times."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.from_gaussian_mechanism(sigma, sampling_prob=q)
    return pld.self_compose(rounds).get_epsilon_for_delta(delta)
