//! Any bytes as a frame through the reference classifier, both directions, with a flow table
//! that the egress side fills: a verdict, never a panic.
#![no_main]

use std::sync::OnceLock;

use edge_classifier::{
    catalogue::Catalogue,
    compile::{Compiled, compile},
    reference::{FlowTable, Reference},
};
use libfuzzer_sys::fuzz_target;

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| compile(&Catalogue::default_catalogue()).expect("default compiles"))
}

fuzz_target!(|data: &[u8]| {
    let c = compiled();
    let reference = Reference::new(c);
    let role = c.role_mask("external").expect("role");
    let mut flows = FlowTable::default();
    reference.egress(data, role, &mut flows, 1);
    reference.ingress(data, role, &mut flows, 2);
});
