//! Project tasks, run as `cargo xtask <task>` (being built).

fn main() {
    eprintln!("usage: cargo xtask <task>; no tasks exist yet");
    std::process::exit(2);
}
