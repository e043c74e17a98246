//! Compile-time behaviour of the attributes: misuse gives an error on the right span,
//! and every supported signature shape compiles. They live in this package, not the workspace
//! root, because trybuild builds them with the dependencies of the package they live in.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
