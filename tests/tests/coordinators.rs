//! Several coordinators sharing one pool of expert workers (data-parallel attention): each
//! serves its own requests with its own KV cache and scheduler, the workers serve both, and
//! batches of one layer that reach a worker together run as one expert call.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use switchyard_tests::{completion_bodies, fixtures, one_by_one, together, Server, Worker};
use switchyard_wire::pb;

/// A worker's Load report.
fn load(addr: &str) -> pb::LoadReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client =
            pb::expert_service_client::ExpertServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        client.load(pb::LoadRequest {}).await.unwrap().into_inner()
    })
}

#[test]
fn two_coordinators_share_two_workers_and_give_each_request_its_answer_alone() {
    let model = fixtures().join("tiny-mixtral-trained");
    let bodies = completion_bodies();
    let want = {
        let embedded = Server::start(&model, &[]);
        one_by_one(&embedded, &bodies)
    };
    let workers = [
        Worker::start_with(&model, &["--experts", "0-3", "--coalesce", "on"]),
        Worker::start_with(&model, &["--experts", "4-7", "--coalesce", "on"]),
    ];
    let spec = format!("{}=0-3,{}=4-7", workers[0].addr, workers[1].addr);
    let coordinators = [
        Server::start(&model, &["--workers", &spec]),
        Server::start(&model, &["--workers", &spec]),
    ];
    let (a, b) = bodies.split_at(16);
    // Both coordinators' 16 streams at once, a few rounds, until the workers have run batches
    // from the two together (each round's answers checked).
    let mut coalesced = 0;
    for round in 0..5 {
        let (got_a, got_b) = std::thread::scope(|s| {
            let ta = s.spawn(|| together(&coordinators[0], a));
            let tb = s.spawn(|| together(&coordinators[1], b));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        for (i, (g, w)) in got_a.iter().chain(&got_b).zip(&want).enumerate() {
            assert_eq!(g, w, "round {round}, request {i}: against embedded alone");
        }
        coalesced = workers
            .iter()
            .map(|w| load(&w.addr).coalesced_batches)
            .sum();
        if coalesced > 0 {
            break;
        }
    }
    assert!(coalesced > 0, "no worker ran two batches in one call");
    for w in &workers {
        let r = load(&w.addr);
        assert!(r.expert_calls + r.coalesced_batches >= r.batches_total);
        assert!(r.expert_calls <= r.batches_total, "{r:?}");
        assert!(r.joined_batches <= r.coalesced_batches, "{r:?}");
    }
}
