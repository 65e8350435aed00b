//! `hasten-env [--check]`: the environment report (`hasten env` runs this program, which links libtorch,
//! so that `hasten` itself does not).

fn main() {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    print!("{}", hasten::utils::env_report(check));
}
