//! The upstream SSE parser on any bytes, cut into chunks where the input says: never a panic,
//! no event over the bound, and the same events whatever the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::upstream::sse::SseParser;

const BOUND: usize = 4096;

fn events(chunks: &[&[u8]]) -> Option<Vec<(Option<String>, String)>> {
    let mut p = SseParser::new(BOUND);
    let mut out = Vec::new();
    for c in chunks {
        p.push(c);
        while let Some(e) = p.next_event().ok()? {
            assert!(e.data.len() <= BOUND);
            out.push((e.name().map(str::to_string), e.data.to_string()));
        }
    }
    if let Some(e) = p.finish().ok()? {
        out.push((e.name().map(str::to_string), e.data.to_string()));
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let chunks: Vec<&[u8]> = body.chunks(step).collect();
    let split = events(&chunks);
    let whole = events(&[body]);
    // A stream refused as too big may be refused at another event when cut differently.
    if let (Some(a), Some(b)) = (split, whole) {
        assert_eq!(a, b);
    }
});
