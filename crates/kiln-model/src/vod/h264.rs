//! The picture size an H.264 sequence parameter set declares, read from the bytes (ITU-T H.264 §7.3.2.1.1).
//!
//! A decoder allocates pictures of the coded size its SPS declares, whatever the container says. GStreamer's
//! `h264parse` keeps the container's width and height in its caps when the container has them, so a 64x64 MP4
//! track whose SPS says 7680x4320 looks 64x64 until a decoder runs. Reading the SPS from the track's `avcC`
//! (`codec_data`) lets the daemon refuse it before any decoder allocates a picture.

/// A bit reader over an RBSP (emulation-prevention bytes already removed).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |acc, _| Some((acc << 1) | self.bit()?))
    }

    /// ue(v): unsigned Exp-Golomb, at most 32 leading zeros.
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }

    /// se(v): signed Exp-Golomb.
    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// The RBSP of a NAL unit's payload: every `00 00 03` loses its `03`.
fn unescape(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

fn skip_scaling_list(r: &mut Bits<'_>, size: usize) -> Option<()> {
    let (mut last, mut next) = (8i64, 8i64);
    for _ in 0..size {
        if next != 0 {
            next = (last + r.se()? + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Some(())
}

/// The coded size (width, height in pixels, before cropping: what a decoder allocates) that an SPS NAL unit
/// (starting with its header byte, type 7) declares; `None` if it is not an SPS or is malformed.
pub fn sps_coded_size(nal: &[u8]) -> Option<(u32, u32)> {
    if nal.first()? & 0x1f != 7 {
        return None;
    }
    let rbsp = unescape(&nal[1..]);
    let mut r = Bits {
        data: &rbsp,
        pos: 0,
    };
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // seq_parameter_set_id
    if matches!(
        profile,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        let chroma = r.ue()?;
        if chroma == 3 {
            r.bit()?; // separate_colour_plane_flag
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return None;
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let w_mbs = u64::from(r.ue()?) + 1;
    let h_units = u64::from(r.ue()?) + 1;
    let frame_mbs_only = u64::from(r.bit()?);
    let w = w_mbs * 16;
    let h = (2 - frame_mbs_only) * h_units * 16;
    Some((
        w.min(u64::from(u32::MAX)) as u32,
        h.min(u64::from(u32::MAX)) as u32,
    ))
}

/// The largest coded size any SPS in an `avcC` record (MP4/MKV `codec_data`) declares.
pub fn avcc_coded_size(avcc: &[u8]) -> Option<(u32, u32)> {
    if avcc.first() != Some(&1) {
        return None;
    }
    let count = usize::from(*avcc.get(5)? & 0x1f);
    let mut at = 6;
    let mut best: Option<(u32, u32)> = None;
    for _ in 0..count {
        let len = usize::from(u16::from_be_bytes([*avcc.get(at)?, *avcc.get(at + 1)?]));
        let nal = avcc.get(at + 2..at + 2 + len)?;
        if let Some((w, h)) = sps_coded_size(nal) {
            if best
                .is_none_or(|(bw, bh)| u64::from(w) * u64::from(h) > u64::from(bw) * u64::from(bh))
            {
                best = Some((w, h));
            }
        }
        at += 2 + len;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes Exp-Golomb and plain bits, for SPSs made to measure.
    #[derive(Default)]
    struct W {
        bits: Vec<u8>,
    }

    impl W {
        fn u(&mut self, n: u32, v: u32) -> &mut Self {
            for i in (0..n).rev() {
                self.bits.push(((v >> i) & 1) as u8);
            }
            self
        }
        fn ue(&mut self, v: u32) -> &mut Self {
            let x = u64::from(v) + 1;
            let len = 64 - x.leading_zeros();
            for _ in 0..len - 1 {
                self.bits.push(0);
            }
            for i in (0..len).rev() {
                self.bits.push(((x >> i) & 1) as u8);
            }
            self
        }
        fn bytes(&self) -> Vec<u8> {
            let mut bits = self.bits.clone();
            bits.push(1); // rbsp_stop_one_bit
            while bits.len() % 8 != 0 {
                bits.push(0);
            }
            let raw: Vec<u8> = bits
                .chunks(8)
                .map(|c| c.iter().fold(0, |a, b| (a << 1) | b))
                .collect();
            // emulation prevention, as an encoder writes it
            let mut out = vec![0x67];
            let mut zeros = 0;
            for b in raw {
                if zeros >= 2 && b <= 3 {
                    out.push(3);
                    zeros = 0;
                }
                zeros = if b == 0 { zeros + 1 } else { 0 };
                out.push(b);
            }
            out
        }
    }

    fn baseline_sps(w_mbs: u32, h_mbs: u32) -> Vec<u8> {
        let mut w = W::default();
        w.u(8, 66).u(8, 0xc0).u(8, 51).ue(0); // profile, constraints, level, id
        w.ue(0).ue(0).ue(0); // log2_max_frame_num-4, poc type 0, log2_max_poc_lsb-4
        w.ue(1).u(1, 0); // refs, gaps
        w.ue(w_mbs - 1)
            .ue(h_mbs - 1)
            .u(1, 1)
            .u(1, 1)
            .u(1, 0)
            .u(1, 0);
        w.bytes()
    }

    fn avcc(sps: &[u8]) -> Vec<u8> {
        let mut a = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
        a.extend((sps.len() as u16).to_be_bytes());
        a.extend(sps);
        a.extend([1, 0, 4, 0x68, 0xce, 0x3c, 0x80]);
        a
    }

    #[test]
    fn sizes_of_made_to_measure_and_encoder_written_spss() {
        assert_eq!(sps_coded_size(&baseline_sps(4, 4)), Some((64, 64)));
        assert_eq!(sps_coded_size(&baseline_sps(480, 270)), Some((7680, 4320)));
        assert_eq!(
            sps_coded_size(&baseline_sps(1000, 1000)),
            Some((16000, 16000))
        );
        assert_eq!(
            avcc_coded_size(&avcc(&baseline_sps(480, 270))),
            Some((7680, 4320))
        );
        // x264's 640x360 High-profile SPS, as ffmpeg wrote it into an MP4's avcC (360 is coded as 368, cropped)
        let x264: [u8; 26] = [
            0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00,
            0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96,
        ];
        assert_eq!(sps_coded_size(&x264), Some((640, 368)));
    }

    #[test]
    fn junk_is_not_a_size() {
        assert_eq!(sps_coded_size(&[]), None);
        assert_eq!(sps_coded_size(&[0x68, 1, 2, 3]), None, "a PPS");
        assert_eq!(sps_coded_size(&[0x67, 0x42]), None, "truncated");
        assert_eq!(
            sps_coded_size(&[0x67, 66, 0, 30, 0, 0, 0, 0, 0]),
            None,
            "ue() past 32 zeros"
        );
        assert_eq!(avcc_coded_size(&[0, 1, 2]), None);
        assert_eq!(
            avcc_coded_size(&[1, 66, 0, 30, 0xff, 0xe1, 0x00, 0x40, 0x67]),
            None,
            "short"
        );
    }

    proptest::proptest! {
        /// No input makes the reader panic or loop; what it returns for a made SPS is the size written.
        #[test]
        fn any_bytes_are_read_safely(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = sps_coded_size(&bytes);
            let _ = avcc_coded_size(&bytes);
        }

        #[test]
        fn made_spss_read_back(w in 1u32..600, h in 1u32..600) {
            proptest::prop_assert_eq!(sps_coded_size(&baseline_sps(w, h)), Some((w * 16, h * 16)));
        }
    }
}
