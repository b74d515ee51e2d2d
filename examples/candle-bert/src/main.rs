//! `candle-bert DIR`: loads the BERT model in DIR through tensorlift and through candle, runs
//! both on the same input, and exits 1 if their outputs differ.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: candle-bert DIR   (DIR holds config.json and model.safetensors; see make_model.py)");
        return ExitCode::from(2);
    };
    match candle_bert::compare(std::path::Path::new(&dir)) {
        Ok(c) => {
            println!(
                "output {:?}: largest difference {} (tensorlift {:?} the tensors to candle in {:.3} s)",
                c.shape, c.max_abs_diff, c.handover, c.tensorlift_secs
            );
            if c.max_abs_diff == 0.0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
