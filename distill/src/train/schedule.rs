//! Learning-rate schedules with the semantics of transformers' schedulers: the learning rate of
//! optimizer step `step` (0-based) is `learning_rate · factor(step)`.

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// Cosine decay to `min_lr_ratio` (`cosine_with_min_lr`; plain `cosine` when the ratio is 0).
    #[default]
    Cosine,
    Linear,
    Constant,
}

impl std::str::FromStr for Scheduler {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "cosine" | "cosine_with_min_lr" => Ok(Scheduler::Cosine),
            "linear" => Ok(Scheduler::Linear),
            "constant" | "constant_with_warmup" => Ok(Scheduler::Constant),
            other => Err(format!("unknown lr_scheduler `{other}` (cosine, linear or constant)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub learning_rate: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// Warmup steps from `warmup_ratio` as TRL computes them: `ceil(ratio · total)`.
    pub fn warmup_from_ratio(ratio: f64, total_steps: usize) -> usize {
        (ratio * total_steps as f64).ceil() as usize
    }

    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (step - self.warmup_steps) as f64 / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = progress.min(1.0);
        let factor = match self.scheduler {
            Scheduler::Constant => 1.0,
            Scheduler::Linear => 1.0 - progress,
            Scheduler::Cosine => 0.5 * (1.0 + (PI * progress).cos()),
        };
        self.learning_rate * (factor * (1.0 - self.min_lr_ratio) + self.min_lr_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let schedule = Schedule { learning_rate: 1.0, scheduler: Scheduler::Cosine, warmup_steps: 2, total_steps: 10, min_lr_ratio: 0.1 };
        assert_eq!(schedule.lr(0), 0.0);
        assert_eq!(schedule.lr(1), 0.5);
        assert_eq!(schedule.lr(2), 1.0);
        assert!((schedule.lr(6) - 0.55).abs() < 1e-12);
        assert!((schedule.lr(10) - 0.1).abs() < 1e-12);
        let linear = Schedule { scheduler: Scheduler::Linear, min_lr_ratio: 0.0, ..schedule.clone() };
        assert!((linear.lr(6) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::warmup_from_ratio(0.03, 1000), 30);
    }
}
