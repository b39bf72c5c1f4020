//! Which worker runs which expert of a layer, and each worker's share of the rows: pure
//! functions of the routed counts, the hosts and the load in flight.

use switchyard_model::RoutePlan;

/// One worker's share of a layer.
pub(super) struct Share {
    pub worker: usize,
    /// Its work in [`assign`]'s measure, counted in flight while it is away.
    pub cost: usize,
    /// Global row index of each row sent.
    pub rows: Vec<usize>,
    pub plan: RoutePlan,
}

/// What running one expert costs a worker beyond its tokens, in tokens. Each expert of a batch
/// reads its weights once whatever its token count, and at decode batch sizes that read is
/// most of the work: a CPU worker's AMX kernel takes up to 16 tokens per pass over a weight
/// at about the cost of one, and an accelerator streams the weights once per batch too.
pub(super) const EXPERT_COST_TOKENS: usize = 16;

/// Chooses a host for every expert with tokens (`count[e]` of them) among `hosts(e)`: heaviest
/// expert first, each to the host with the least load, that is `base[w]` plus what this call
/// gave it so far; on ties the one given least before (`past[w]`), then the lowest index; an
/// expert of `c` tokens weighs
/// `c + EXPERT_COST_TOKENS`. Returns each expert's host (`usize::MAX` where it has no tokens)
/// and each worker's load given; `Err(e)`: expert `e` has tokens and no host.
///
/// Counting tokens alone, a layer of evenly used experts could give one worker five experts'
/// weights to read and the other three; placing the heaviest first keeps the last choices
/// small, so the loads end close.
pub(super) fn assign<I: Iterator<Item = usize>>(
    count: &[usize],
    hosts: impl Fn(usize) -> I,
    base: &[usize],
    past: &[u64],
) -> Result<(Vec<usize>, Vec<usize>), usize> {
    let mut order: Vec<usize> = (0..count.len()).filter(|&e| count[e] > 0).collect();
    order.sort_by_key(|&e| (std::cmp::Reverse(count[e]), e));
    let mut given = vec![0usize; base.len()];
    let mut choice = vec![usize::MAX; count.len()];
    for e in order {
        let best = hosts(e)
            .min_by_key(|&w| (base[w] + given[w], past[w] + given[w] as u64, w))
            .ok_or(e)?;
        choice[e] = best;
        given[best] += count[e] + EXPERT_COST_TOKENS;
    }
    Ok((choice, given))
}

/// Splits `plan` into per-worker shares by `choice` (each expert's worker): a row goes to a
/// worker once, with only that worker's entries, visiting its workers in the order of their
/// first slot. Row `i` of `plan` is global row `global[i]`; `cost[w]` is what [`assign`] gave
/// worker `w`. Shares come in worker order.
pub(super) fn split_rows(
    plan: &RoutePlan,
    global: &[usize],
    choice: &[usize],
    cost: &[usize],
) -> Vec<Share> {
    let mut shares: Vec<Share> = Vec::new();
    let mut slot = vec![usize::MAX; cost.len()];
    for (r, &g) in global.iter().enumerate().take(plan.rows()) {
        let exps = plan.row_experts(r);
        let ws = plan.row_weights(r);
        for (i, &e) in exps.iter().enumerate() {
            let w = choice[e as usize];
            if exps[..i].iter().any(|&p| choice[p as usize] == w) {
                continue;
            }
            if slot[w] == usize::MAX {
                slot[w] = shares.len();
                shares.push(Share {
                    worker: w,
                    cost: cost[w],
                    rows: Vec::new(),
                    plan: RoutePlan::new(),
                });
            }
            let s = &mut shares[slot[w]];
            s.rows.push(g);
            s.plan.push_row(
                exps.iter()
                    .zip(ws)
                    .filter(|(e, _)| choice[**e as usize] == w)
                    .map(|(e, w)| (*e, *w)),
            );
        }
    }
    shares.sort_by_key(|s| s.worker);
    shares
}

#[cfg(test)]
mod tests {
    use super::{assign, split_rows, EXPERT_COST_TOKENS};
    use switchyard_model::RoutePlan;

    /// Hosts 0..n for every expert.
    fn everywhere(n: usize) -> impl Fn(usize) -> std::ops::Range<usize> {
        move |_| 0..n
    }

    #[test]
    fn evenly_used_experts_split_evenly_over_replicas() {
        // A decode step of 32 sequences: 64 picks over 8 experts, unevenly.
        let count = [12, 5, 9, 6, 10, 7, 8, 7];
        let (choice, given) = assign(&count, everywhere(2), &[0, 0], &[0, 0]).unwrap();
        let on0 = choice.iter().filter(|&&w| w == 0).count();
        assert_eq!(on0, 4, "experts per worker: {choice:?}");
        let total: usize = count.iter().map(|c| c + EXPERT_COST_TOKENS).sum();
        assert_eq!(given.iter().sum::<usize>(), total);
        assert!(
            given[0].abs_diff(given[1]) <= 12 + EXPERT_COST_TOKENS,
            "{given:?}"
        );
    }

    #[test]
    fn each_worker_reads_about_as_many_weights_whatever_the_token_counts() {
        // Counting tokens alone, in index order, the first worker would take the big expert
        // and the second six small ones.
        let count = [30, 3, 3, 3, 3, 3, 3, 3];
        let (choice, _) = assign(&count, everywhere(2), &[0, 0], &[0, 0]).unwrap();
        let on1 = choice.iter().filter(|&&w| w == 1).count();
        assert!((3..=5).contains(&on1), "experts per worker: {choice:?}");
    }

    #[test]
    fn load_in_flight_and_placement_steer_the_choice() {
        let count = [1, 1, 0, 1];
        // Expert 3 lives on worker 0 alone; the others anywhere; worker 0 is busy.
        let hosts = |e: usize| if e == 3 { 0..1 } else { 0..2 };
        let (choice, given) = assign(&count, hosts, &[1000, 0], &[0, 0]).unwrap();
        assert_eq!(choice, vec![1, 1, usize::MAX, 0]);
        assert_eq!(
            given,
            vec![1 + EXPERT_COST_TOKENS, 2 * (1 + EXPERT_COST_TOKENS)]
        );
    }

    #[test]
    fn replicas_take_turns_when_nothing_is_in_flight() {
        // Batch-1 decode over 4 full replicas: two experts per layer, nothing in flight
        // between layers. Counting what each was given before, all four share the calls.
        let mut past = [0u64; 4];
        let mut used = [0usize; 4];
        for layer in 0..8 {
            let mut count = [0usize; 8];
            count[layer % 8] = 1;
            count[(layer + 3) % 8] = 1;
            let (choice, given) = assign(&count, everywhere(4), &[0; 4], &past).unwrap();
            for (w, g) in given.iter().enumerate() {
                past[w] += *g as u64;
                used[w] += usize::from(*g > 0);
            }
            // The two experts still go to two workers.
            let hosts: Vec<usize> = choice
                .iter()
                .copied()
                .filter(|&w| w != usize::MAX)
                .collect();
            assert_ne!(hosts[0], hosts[1], "layer {layer}: {choice:?}");
        }
        assert_eq!(used, [4; 4], "calls per worker over 8 layers");
    }

    #[test]
    fn an_expert_with_tokens_and_no_host_is_named() {
        let hosts = |e: usize| if e == 2 { 0..0 } else { 0..1 };
        assert_eq!(assign(&[1, 0, 4], hosts, &[0], &[0]), Err(2));
        // Without tokens it needs no host.
        assert!(assign(&[1, 0, 0], hosts, &[0], &[0]).is_ok());
    }

    #[test]
    fn a_row_goes_to_each_of_its_workers_once_with_only_their_entries() {
        let mut plan = RoutePlan::new();
        plan.push_row([(0u16, 0.6f32), (1, 0.4)]);
        plan.push_row([(2u16, 0.7f32), (0, 0.3)]);
        plan.push_row([(1u16, 0.5f32), (3, 0.5)]);
        // Experts 0 and 1 on worker 1, 2 and 3 on worker 0.
        let choice = [1, 1, 0, 0];
        let shares = split_rows(&plan, &[10, 11, 12], &choice, &[5, 6]);
        assert_eq!(shares.len(), 2);
        assert_eq!((shares[0].worker, shares[0].cost), (0, 5));
        assert_eq!(shares[0].rows, vec![11, 12]);
        assert_eq!(shares[0].plan.row_experts(0), [2]);
        assert_eq!(shares[0].plan.row_experts(1), [3]);
        assert_eq!(shares[1].rows, vec![10, 11, 12]);
        assert_eq!(shares[1].plan.row_experts(0), [0, 1]);
        assert_eq!(shares[1].plan.row_weights(0), [0.6, 0.4]);
        assert_eq!(shares[1].plan.row_experts(1), [0]);
        assert_eq!(shares[1].plan.row_weights(2), [0.5]);
    }
}
