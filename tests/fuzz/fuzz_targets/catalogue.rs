//! Any text through the catalogue parser, validator and compiler: an error or a catalogue,
//! never a panic.
#![no_main]

use edge_classifier::{catalogue::Catalogue, compile::compile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cat) = Catalogue::parse("fuzz.toml", text) {
        let _ = cat.warnings();
        let _ = compile(&cat);
    }
});
