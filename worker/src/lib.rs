//! switchyard's expert worker: hosts a subset of every layer's experts and answers expert batches
//! from coordinators. The compute is `switchyard_model::LocalExperts`, the same code embedded mode
//! runs, so a cluster reproduces embedded results bit for bit.
