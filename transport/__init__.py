"""Flow matching on the linear interpolant (SiT, REPA): time conventions, time grids, Euler/Heun ODE solves,
guidance with a channel count and an interval, and the training loss.

Internally time is the noise level σ in [0, 1] with x_σ = (1 - σ)·x + σ·ε, and the velocity is
u = dx_σ/dσ = ε - x; sampling runs from σ = 1 (noise) to σ = 0 (data). A teacher's own convention
(`CONVENTIONS`) says what time its network is fed and what sign its output has.
"""
from .linear import (ADAPTIVE, CONVENTIONS, LAST_STEPS, SIT_TOLERANCES, SOLVERS, Convention, GuidedVelocity,
                     euler_jump, flow_matching_loss, last_step_of, sigma_of_alpha_bar, solve_adaptive,
                     solve_progressive, student_steps, time_grid, x0_from_velocity)

__all__ = ["ADAPTIVE", "CONVENTIONS", "LAST_STEPS", "SIT_TOLERANCES", "SOLVERS", "Convention", "GuidedVelocity",
           "euler_jump", "flow_matching_loss", "last_step_of", "sigma_of_alpha_bar", "solve_adaptive",
           "solve_progressive", "student_steps", "time_grid", "x0_from_velocity"]
