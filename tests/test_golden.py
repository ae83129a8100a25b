"""Parity with the published PeRFlow scheduler (../shared/golden): the contract for all window math."""

import numpy as np
import pytest
import torch

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.parameterization import velocity
from perflow_core.sampling import sample_perflow
from perflow_core.schedule import alphas_cumprod_at, perflow_sigmas, perflow_timesteps, sd_alphas_cumprod
from perflow_core.windows import window_of

TOL = dict(atol=1e-4, rtol=1e-4)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU run happens where one exists


def comfy_style_model(ms, network):
    """ComfyUI's BaseModel._apply_model around `network`: input scaling, timestep, then denoised."""

    def model(x, s):
        return ms.calculate_denoised(s, network(ms.calculate_input(s, x), ms.timestep(s)), x)

    return model


def recorded_network(x, timestep):
    """The golden README's deterministic stand-in network; timestep is one value per batch item."""
    return torch.tanh(x) * 0.7 + 0.05 * (timestep.reshape(-1, 1, 1, 1) / 1000)


def test_alphas_cumprod_matches_recorded_table(golden):
    _, tensors = golden
    torch.testing.assert_close(sd_alphas_cumprod(), tensors["alphas_cumprod"], atol=1e-7, rtol=1e-6)


def test_schedules_match_published_set_timesteps(golden):
    meta, _ = golden
    for rec in meta["schedules"]:
        ours = perflow_timesteps(rec["steps"], rec["windows"]).tolist()
        assert ours == rec["timesteps"], rec
        sigmas = perflow_sigmas(rec["steps"], rec["windows"])
        expected = np.array(rec["timesteps"] + [0]) / 1000
        np.testing.assert_allclose(sigmas.numpy(), expected, atol=1e-7)


def test_single_steps_match_published_step(golden):
    meta, tensors = golden
    for rec in meta["steps"]:
        k = rec["key"]
        x, out = tensors[f"{k}.sample"], tensors[f"{k}.model_output"]
        ts = perflow_timesteps(rec["steps"], rec["windows"]).tolist() + [0]
        t, t_next = rec["timestep"] / 1000, ts[ts.index(rec["timestep"]) + 1] / 1000
        v = velocity(rec["prediction_type"], out, x, torch.tensor(t), tensors["alphas_cumprod"], rec["windows"])
        torch.testing.assert_close(x + (t_next - t) * v, tensors[f"{k}.prev_sample"], **TOL, msg=str(rec))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("update", ["sample_perflow", "stock_euler"])
def test_trajectories_match_published_pipeline(golden, update, device):
    meta, tensors = golden
    for rec in meta["trajectories"]:
        k = rec["key"]
        ms = PeRFlowModelSampling(rec["prediction_type"], rec["windows"], tensors["alphas_cumprod"]).to(device)
        sigmas = perflow_sigmas(rec["steps"], rec["windows"]).to(device)
        noise = tensors[f"{k}.init"].to(device)
        x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)

        model = comfy_style_model(ms, recorded_network)
        path = []
        if update == "sample_perflow":
            seen = []
            x = sample_perflow(model, x, sigmas, callback=seen.append, disable=True)
            path = [d["x"] for d in seen[1:]] + [x]
        else:  # ComfyUI's sample_euler update, written out: d = (x - denoised)/sigma
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                d = (x - model(x, sigmas[i] * s_in)) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
                path.append(x)
        x = ms.inverse_noise_scaling(sigmas[-1], x)
        torch.testing.assert_close(torch.stack(path).cpu(), tensors[f"{k}.path"], **TOL, msg=str(rec))
        torch.testing.assert_close(x.cpu(), tensors[f"{k}.final"], **TOL, msg=str(rec))


def test_window_bookkeeping_matches_get_window_alpha(golden):
    meta, tensors = golden
    ac = tensors["alphas_cumprod"]
    for rec in meta["windows"]:
        k, n = rec["key"], rec["windows"]
        t = tensors[f"{k}.timepoints"]
        t_s, t_e = window_of(t, n)
        torch.testing.assert_close(t_s, tensors[f"{k}.t_start"].to(t_s.dtype), atol=0, rtol=0)
        torch.testing.assert_close(t_e, tensors[f"{k}.t_end"].to(t_e.dtype), atol=0, rtol=0)
        ac_s, ac_e = alphas_cumprod_at(ac, t_s), alphas_cumprod_at(ac, t_e)
        torch.testing.assert_close(ac_s, tensors[f"{k}.alphas_cumprod_start"].to(ac_s.dtype), **TOL)
        torch.testing.assert_close(ac_e, tensors[f"{k}.alphas_cumprod_end"].to(ac_e.dtype), **TOL)
        torch.testing.assert_close((ac_s / ac_e) ** 0.5, tensors[f"{k}.gamma_s_e"].to(ac_s.dtype), **TOL)
