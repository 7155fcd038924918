// The migrations are embedded by `sqlx::migrate!`; rebuild when one is
// added or changed (what `sqlx migrate build-script` generates).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
