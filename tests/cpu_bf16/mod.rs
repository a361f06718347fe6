//! What `--precision bf16` must do on the CPU the tests run on, read from `/proc/cpuinfo`
//! rather than from the library (whose own checks are what the tests check):
//!
//! - an Intel CPU with AVX512_BF16 (Sapphire Rapids and later; the CI's Intel guests): bf16
//!   runs, and the tests check its images;
//! - a CPU with AVX512_BF16 from another vendor (AMD Zen 4 and later, the CI's AMD guests): the
//!   OpenVINO plugin offers Intel devices only, so the runtime refuses bf16 before loading
//!   anything, with a message naming the vendor rule;
//! - a CPU without AVX512_BF16: refused by the configuration check (emulated bf16 is slower
//!   than fp32).
//!
//! Each test asserts the branch it is in, so none passes by doing nothing: on a CPU where bf16
//! should run, a refusal fails the test, and where it should be refused, a run fails it.

/// The expected outcome of `--precision bf16` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Here {
    Runs,
    /// Refused; the error contains this text.
    Refused(&'static str),
}

pub fn bf16_here() -> Bf16Here {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let has_bf16 = field("flags")
        .split_whitespace()
        .any(|f| f == "avx512_bf16");
    match (has_bf16, field("vendor_id").as_str()) {
        (false, _) => Bf16Here::Refused("AVX512_BF16"),
        (true, "GenuineIntel") => Bf16Here::Runs,
        (true, _) => Bf16Here::Refused("Intel devices only"),
    }
}
