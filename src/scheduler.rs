//! The LMS discrete scheduler, numerically matched to diffusers' LMSDiscreteScheduler.
