//! A plain f64 Mixtral forward written straight from the semantics in the fixtures' README:
//! no cache, no batching, no SIMD. Tests check it against the Hugging Face goldens first, then
//! use it as the oracle for shapes the goldens do not cover (sliding windows, head_dim ≠
//! hidden/heads, k = 1, odd sizes).

use crate::{
    weights::{names, Checkpoint},
    MixtralConfig,
};

pub struct RefOutput {
    /// `[T][vocab]`
    pub logits: Vec<Vec<f64>>,
    /// `[layer][T][k]` expert ids, descending probability.
    pub experts: Vec<Vec<Vec<usize>>>,
    /// `[layer][T][k]` renormalised weights.
    pub weights: Vec<Vec<Vec<f64>>>,
    /// `[layer][T][n_experts]` router probabilities (to judge near-ties).
    pub probs: Vec<Vec<Vec<f64>>>,
}

struct Mat {
    rows: usize,
    cols: usize,
    v: Vec<f64>,
    /// Stored as Q8_0/Q4_0 blocks: `v` holds what they stand for, and the input is quantized
    /// to 8 bits per 32-element block first, as the CPU kernels do.
    quant: bool,
}

fn load(ck: &Checkpoint, name: &str) -> Mat {
    let t = ck.tensor(name, &shape_of(ck, name)).unwrap();
    let quant = t.dtype().quant().is_some();
    let v: Vec<f64> = t.to_f32_vec().into_iter().map(f64::from).collect();
    let (rows, cols) = match t.shape() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        s => panic!("unexpected shape {s:?}"),
    };
    Mat {
        rows,
        cols,
        v,
        quant,
    }
}

fn shape_of(ck: &Checkpoint, name: &str) -> Vec<usize> {
    let c = ck.config();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    if name.ends_with("layernorm.weight") || name == names::FINAL_NORM {
        vec![h]
    } else if name.contains("q_proj") {
        vec![c.q_dim(), h]
    } else if name.contains("k_proj") || name.contains("v_proj") {
        vec![c.kv_dim(), h]
    } else if name.contains("o_proj") {
        vec![h, c.q_dim()]
    } else if name.contains("gate.weight") {
        vec![c.num_local_experts, h]
    } else if name.ends_with("w2.weight") {
        vec![h, i]
    } else if name.ends_with("w1.weight") || name.ends_with("w3.weight") {
        vec![i, h]
    } else {
        vec![c.vocab_size, h]
    }
}

/// `x · Wᵀ`
fn lin(x: &[f64], w: &Mat) -> Vec<f64> {
    let xq;
    let x = if w.quant {
        xq = quantize_blocks(x);
        &xq
    } else {
        x
    };
    (0..w.rows)
        .map(|j| (0..w.cols).map(|k| x[k] * w.v[j * w.cols + k]).sum())
        .collect()
}

/// `x` through 8-bit quantization per 32-element block (`d = max|x| / 127`, nearest even):
/// the values the kernels multiply.
fn quantize_blocks(x: &[f64]) -> Vec<f64> {
    x.chunks(32)
        .flat_map(|b| {
            let d = b.iter().fold(0f64, |m, v| m.max(v.abs())) / 127.0;
            b.iter().map(move |v| {
                if d == 0.0 {
                    0.0
                } else {
                    (v / d).round_ties_even() * d
                }
            })
        })
        .collect()
}

fn rms(x: &[f64], w: &Mat, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.v).map(|(a, b)| a * inv * b).collect()
}

fn rope(x: &mut [f64], heads: usize, hd: usize, pos: usize, theta: f64) {
    let half = hd / 2;
    for h in 0..heads {
        let v = &mut x[h * hd..(h + 1) * hd];
        for i in 0..half {
            let ang = pos as f64 * theta.powf(-(2.0 * i as f64) / hd as f64);
            let (c, s) = (ang.cos(), ang.sin());
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

pub fn forward(ck: &Checkpoint, ids: &[u32]) -> RefOutput {
    let c: &MixtralConfig = ck.config();
    let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let eps = c.rms_norm_eps;
    let t = ids.len();
    let embed = load(ck, names::EMBED);
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&i| embed.v[i as usize * embed.cols..(i as usize + 1) * embed.cols].to_vec())
        .collect();
    let (mut experts, mut weights, mut probs) = (vec![], vec![], vec![]);
    for l in 0..c.num_hidden_layers {
        let n = |s: &str| names::layer(l, s);
        let (wq, wk, wv, wo) = (
            load(ck, &n("self_attn.q_proj.weight")),
            load(ck, &n("self_attn.k_proj.weight")),
            load(ck, &n("self_attn.v_proj.weight")),
            load(ck, &n("self_attn.o_proj.weight")),
        );
        let ln1 = load(ck, &n("input_layernorm.weight"));
        let ln2 = load(ck, &n("post_attention_layernorm.weight"));
        let gate = load(ck, &names::router(l));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (p, xi) in x.iter().enumerate() {
            let h = rms(xi, &ln1, eps);
            let mut q = lin(&h, &wq);
            let mut k = lin(&h, &wk);
            rope(&mut q, nh, hd, p, c.rope_theta);
            rope(&mut k, nkv, hd, p, c.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(lin(&h, &wv));
        }
        for i in 0..t {
            let mut att = vec![0.0; nh * hd];
            for h in 0..nh {
                let g = h / (nh / nkv);
                let lo = c.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
                let sc: Vec<f64> = (lo..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qs[i][h * hd + d] * ks[j][g * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (jj, j) in (lo..=i).enumerate() {
                    for d in 0..hd {
                        att[h * hd + d] += e[jj] / z * vs[j][g * hd + d];
                    }
                }
            }
            let o = lin(&att, &wo);
            x[i].iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
        let (mut le, mut lw, mut lp) = (vec![], vec![], vec![]);
        for xi in x.iter_mut() {
            let h = rms(xi, &ln2, eps);
            let logits = lin(&h, &gate);
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / z).collect();
            let mut idx: Vec<usize> = (0..p.len()).collect();
            idx.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
            let top = &idx[..c.num_experts_per_tok];
            let s: f64 = top.iter().map(|&e| p[e]).sum();
            let w: Vec<f64> = top.iter().map(|&e| p[e] / s).collect();
            let mut out = vec![0.0; h.len()];
            for (&e, &we) in top.iter().zip(&w) {
                let w1 = load(ck, &names::expert(l, e, "w1"));
                let w3 = load(ck, &names::expert(l, e, "w3"));
                let w2 = load(ck, &names::expert(l, e, "w2"));
                let a = lin(&h, &w1);
                let b = lin(&h, &w3);
                let m: Vec<f64> = a
                    .iter()
                    .zip(&b)
                    .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                    .collect();
                let y = lin(&m, &w2);
                out.iter_mut().zip(y).for_each(|(o, y)| *o += we * y);
            }
            xi.iter_mut().zip(out).for_each(|(a, b)| *a += b);
            le.push(top.to_vec());
            lw.push(w);
            lp.push(p);
        }
        experts.push(le);
        weights.push(lw);
        probs.push(lp);
    }
    let norm = load(ck, names::FINAL_NORM);
    let head = if c.tie_word_embeddings {
        embed
    } else {
        load(ck, names::LM_HEAD)
    };
    let logits = x
        .iter()
        .map(|xi| lin(&rms(xi, &norm, eps), &head))
        .collect();
    RefOutput {
        logits,
        experts,
        weights,
        probs,
    }
}
