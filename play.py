"""Play a world model with the keyboard: ``python play.py [--checkpoint FILE | --world NAME]``.

Each frame: the held keys go through the world's keymap to an action id, the world-model env
makes the next frame, and it is on screen at once; the engine's cache refresh runs after the
flip, while the loop would otherwise wait for its next tick.

Controls (besides the world's own keys, printed at start):
    H  HUD on/off          R  reset (new context)     1 / 2 / 4  denoising steps
    P  pause               .  one frame while paused  V  start/stop mp4 of the dream
    C  start/stop recording a dataset episode          Tab  real game side by side
    M  take over from / hand back to the --policy agent                Esc  quit
Headless (no window, same loop): ``python play.py --headless --frames 300 --policy random --out dream.mp4``
"""

from __future__ import annotations

import argparse
import secrets
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # before pygame is imported: no banner

import pygame  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from envs.real_game import RealGame  # noqa: E402
from envs.world_model_env import WorldModelEnv  # noqa: E402
from envs.worlds import DEFAULT_WORLD  # noqa: E402
from interactive.hud import FrameStats, Hud  # noqa: E402
from interactive.keys import HeldKeys  # noqa: E402
from interactive.video import VideoWriter  # noqa: E402
from interactive.window import FrameWindow, display_available  # noqa: E402
from record.controllers import Controller, KeyboardController, make_controller  # noqa: E402
from record.session import SessionRecorder  # noqa: E402
from worldmodel.engine import BACKENDS  # noqa: E402
from worldmodel.threads import choose_threads  # noqa: E402

# play.py's own keys (pygame key names); they never reach the world's keymap
UI_KEYS = frozenset({"escape", "h", "r", "1", "2", "4", "p", ".", "v", "c", "tab", "m"})
NOTICE_SECONDS = 2.5  # how long a one-line message stays on the HUD
HEADLESS_FRAMES = 300


class Session:
    """The interactive loop over one world-model env; ``iterate()`` is one frame.

    ``actions`` keeps the action id of every generated frame, so a caller (or a test posting key
    events) can check what the loop did. ``controller`` chooses them; given ``switch_to`` as well,
    M swaps the two mid-episode (a person takes over from an agent and hands back; recordings
    store each frame's controller).
    """

    def __init__(self, env: WorldModelEnv, window: FrameWindow, controller: Controller, held: HeldKeys,
                 fps: float, seed: int | None = None, record_dir: str | Path = "recordings",
                 video_path: str | Path | None = None, switch_to: Controller | None = None) -> None:
        self.env, self.window, self.controller, self.held, self.fps = env, window, controller, held, fps
        self.threads = f"threads {torch.get_num_threads()}"  # main() puts the chosen count and why here
        self.other = switch_to  # the controller M swaps in
        self.names = env.action_names
        self.hud, self.stats = Hud(), FrameStats()
        self.actions: list[int] = []
        self.running, self.paused, self._single = True, False, False
        self.video: VideoWriter | None = None
        self.video_path = video_path
        self.real: RealGame | None = None
        self.notice, self.notice_until = "", 0.0
        # gym_id + make_kwargs + seed remake the dream: replaying actions[1:] repeats it exactly
        meta = {"game": env.game or env.world_name, "source": f"world:{env.world_name}",
                "world": env.world_name, "gym_id": "WorldModel-v0", "fps": env.metadata["render_fps"],
                "action_names": self.names, "keymap": env.keymap.to_dict(), "controller": controller.name,
                "controller_config": controller.config(), "model_size": list(env.observation_space.shape[:2])}
        self.recorder = SessionRecorder(record_dir, meta, env.observation_space.shape)
        self.context_shown_at: float | None = None    # perf_counter when the first reset's frame showed
        self.first_frame_at: float | None = None      # ... and when the first generated frame showed
        self._tick_end = time.perf_counter()          # when the last frame's wait ended
        self.reset(seed)
        self.context_shown_at = time.perf_counter()

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, frames: int | None = None, progress: bool = False) -> None:
        """Iterate until Esc / window closed / replay finished, or ``frames`` frames were made;
        ``progress``: a progress bar on stderr (headless runs show nothing else while they go)."""
        bar = tqdm(total=frames, unit="frame", disable=not progress, file=sys.stderr, leave=False)
        try:
            while self.running and (frames is None or len(self.actions) < frames):
                done = len(self.actions)
                self.iterate()
                bar.update(len(self.actions) - done)
        finally:
            bar.close()

    def iterate(self) -> None:
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.running = False
            elif event.type == pygame.KEYDOWN and pygame.key.name(event.key) in UI_KEYS:
                self.command(pygame.key.name(event.key))
            self.held.update(event)
        if not self.running:
            return
        if self.paused and not self._single:
            self.show()  # keep the HUD live while nothing moves
            self.window.tick(self.fps or 30)
            self._tick_end = time.perf_counter()
            return
        self._single = False
        t_keys = time.perf_counter()  # the key state is read here: latency starts
        action = self.controller.act(self.frame)
        if action is None:  # a replay ran out
            self.running = False
            return
        self.frame, reward, terminated, truncated, _ = self.env.step(action)
        if self.real is not None:
            self.real.step(action)
        self.frame_index += 1
        self.actions.append(action)
        self.show()
        self.stats.frame((time.perf_counter() - t_keys) * 1e3)  # the frame is on screen
        if self.first_frame_at is None:
            self.first_frame_at = time.perf_counter()
        # The cache refresh runs now only if it fits in the wait for the next tick (off the
        # key-to-frame path); otherwise it rides along the next frame's first model call.
        since_tick_ms = (time.perf_counter() - self._tick_end) * 1e3
        self.env.flush(budget_ms=1e3 / self.fps - since_tick_ms if self.fps else 0.0)
        if self.video is not None:
            self.video.write(self.frame, f"{self.frame_index} {self.names[action]}")
        self.recorder.add(self.frame, action, reward, terminated, self.controller.name)
        self.total_reward += reward
        if terminated or truncated:  # the world says game over: start again, like the game would
            self.reset()
        self.window.tick(self.fps)
        self._tick_end = time.perf_counter()

    def show(self) -> None:
        frames = [self.frame] + ([self.real.frame] if self.real is not None else [])
        self.window.draw(frames)
        self.hud.draw(self.window.screen, self.hud_lines(), self.window.clear_strip())
        self.window.flip()

    def hud_lines(self) -> list[str]:
        flags = [f for f, on in (("PAUSED", self.paused), ("REC", self.recorder.on),
                                 ("VIDEO", self.video is not None), ("REAL", self.real is not None)) if on]
        action = self.names[self.actions[-1]] if self.actions else "-"
        lines = [f"{self.env.world_name}  frame {self.frame_index}  {' '.join(flags)}",
                 f"{self.stats.fps:5.1f} FPS  latency {self.stats.latency_ms:5.1f} ms",
                 f"action {action} ({self.controller.name})  steps {self.env.steps}  "
                 f"reward {self.total_reward:+g}",
                 self.threads]
        if self.notice and time.monotonic() < self.notice_until:
            lines.append(self.notice)
        return lines

    # ---- commands ------------------------------------------------------------------------------
    def command(self, key: str) -> None:
        if key == "escape":
            self.running = False
        elif key == "h":
            self.hud.visible = not self.hud.visible
        elif key == "r":
            self.reset()
            self.say("reset: new context")
        elif key in ("1", "2", "4"):
            self.env.steps = int(key)
            self.say(f"{key} denoising step{'s' if key != '1' else ''} per frame")
        elif key == "p":
            self.paused = not self.paused
        elif key == ".":
            self._single = self.paused
        elif key == "v":
            try:
                self.toggle_video()
            except OSError as err:  # an unwritable folder must not end the session
                self.say(str(err))
        elif key == "c":
            on = self.recorder.toggle(self.frame, self.controller.name, self.episode_meta())
            self.say(f"recording to {self.recorder.root}" if on else f"recorded {self.recorder.episodes[-1]}")
        elif key == "tab":
            self.toggle_real()
        elif key == "m" and self.other is not None:
            self.controller, self.other = self.other, self.controller
            self.say(f"{self.controller.name} in control")

    def reset(self, seed: int | None = None) -> None:
        """New context (the real game's first frame when it is shown, so both start together).

        Every episode gets an explicit seed (drawn from the env's generator unless given), so a
        recorded episode names the seed that remakes it.
        """
        self.seed = int(self.env.np_random.integers(2**31)) if seed is None else seed
        options = {"context": self.real.reset(self.seed)[None]} if self.real is not None else None
        self.frame, _ = self.env.reset(seed=self.seed, options=options)
        self.frame_index, self.total_reward = 0, 0.0
        self.recorder.begin(self.frame, self.controller.name, self.episode_meta())
        self.show()  # the context's last frame, on screen before the first key is read

    def episode_meta(self) -> dict:
        """What a recorded episode needs to be remade: seed, env kwargs, and where it started."""
        return {"seed": self.seed, "episode_frame": self.frame_index, "make_kwargs": self.env.make_kwargs,
                "real_game_context": self.real is not None}

    def toggle_video(self) -> None:
        if self.video is not None:
            n = self.video.close()
            self.say(f"saved {self.video.path} ({n} frames)")
            self.video = None
            return
        path = self.video_path or time.strftime("dream-%Y%m%d-%H%M%S.mp4")
        self.video_path = None  # --out names the first video only
        self.video = VideoWriter(path, self.fps or self.env.metadata["render_fps"], self.frame.shape)
        self.say(f"writing {path}")

    def toggle_real(self) -> None:
        if self.real is not None:
            self.real.close()
            self.real = None
            self.window.set_panels(1)
            return
        if not self.env.game:
            self.say("this world names no real game to show")
            return
        try:
            self.real = RealGame(self.env.game, self.names, self.frame.shape)
        except ValueError as err:  # unknown game, missing package, other actions
            self.say(f"no real game: {err}")
            return
        self.window.set_panels(2)
        self.reset()
        self.say(f"real game {self.env.game}: both restarted from its frame")

    def say(self, text: str) -> None:
        self.notice, self.notice_until = text, time.monotonic() + NOTICE_SECONDS
        print(text, flush=True)

    def close(self) -> None:
        if self.video is not None:
            self.toggle_video()
        self.recorder.stop()
        for controller in (self.controller, self.other):
            if controller is not None:
                controller.close()
        if self.real is not None:
            self.real.close()
        self.env.close()


HUD_LINES = 5  # world/frame/flags, FPS/latency, action/steps/reward, threads, a notice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--world", help="a shipped world by name (default: the default world)")
    src.add_argument("--checkpoint", help="a world checkpoint file (.safetensors)")
    p.add_argument("--steps", type=int, choices=(1, 2, 4),
                   help="denoising steps per frame (default: the world's)")
    p.add_argument("--context", default="real", help="real | noise | PATH.png | dataset DIR (default: real)")
    p.add_argument("--seed", type=int,
                   help="seed of the context choice and the noise (same seed, same dream)")
    p.add_argument("--fps", type=float, help="frame cap; default the world's rate (headless: 0 = uncapped)")
    p.add_argument("--policy", nargs="+", metavar="POLICY",
                   help="human | random | replay FILE (default: human; headless: random)")
    p.add_argument("--headless", action="store_true", help="no window: run the same loop off screen")
    p.add_argument("--frames", type=int, help=f"stop after N frames (headless default {HEADLESS_FRAMES})")
    p.add_argument("--out", help="write the dream to this mp4 from the start")
    p.add_argument("--record-dir", default="recordings", help="where C writes dataset episodes")
    p.add_argument("--scale", type=int, help="window zoom (default: about 512 pixels tall)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: chosen by timing a few frames at 1 and all cores)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's hot path (faster frames after a 20-45 s start)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="eager (PyTorch), ort (the model's calls in ONNX Runtime: CPU, float32, ~1.4x "
                        "faster frames, a few seconds more to load; pip install -e .[ort]) or auto "
                        "(default: ort where it can run, else eager)")
    p.add_argument("--separate-refresh", action="store_true",
                   help="never fuse the cache refresh into the next frame's first model call (slower; "
                        "for comparison)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads} (omit it to choose by timing)")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        p.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.frames is not None and args.frames < 1:
        p.error("--frames must be at least 1")
    if args.fps is not None and args.fps < 0:
        p.error("--fps must be >= 0 (0 = uncapped)")
    args.policy = args.policy or (["random"] if args.headless else ["human"])
    if args.headless and args.policy[0] == "human":
        p.error("--headless has no keyboard: use --policy random or --policy replay FILE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.headless and not display_available():
        if args.policy[0] == "human":
            print("play.py: no display to open a window on (no X11/Wayland session found). Run headless "
                  "instead, e.g.\n  python play.py --headless --frames 300 --policy random --out dream.mp4",
                  file=sys.stderr)
            return 2
        print("play.py: no display found: running headless (the same loop, off screen)", file=sys.stderr)
        args.headless = True
    if args.headless:
        pygame.display.quit()
        os.environ["SDL_VIDEODRIVER"] = "dummy"  # SDL's in-memory screen: the same blit/flip path
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is None:  # drawn here, printed below: it seeds the dream and the agent's keys alike
        args.seed = secrets.randbelow(2**31)
    which = args.checkpoint or f"world {args.world or DEFAULT_WORLD}"
    print(f"play.py: loading {which} ...", file=sys.stderr, flush=True)  # takes seconds on a CPU
    try:
        env = WorldModelEnv(checkpoint=args.checkpoint, world=args.world, steps=args.steps, horizon=None,
                            context=args.context, compile=args.compile or None, backend=args.backend,
                            fuse_refresh=False if args.separate_refresh else None)
        if args.threads:
            threads = f"threads {args.threads} (--threads)"
        else:  # a second thread gives little at this size, and beside a busy process it costs a lot
            t0 = time.perf_counter()
            choice = choose_threads(env.runtime.engine.time_frames)
            threads = choice.label()
            print(f"play.py: {threads}, chosen in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        threads += f"  backend {env.runtime.engine.backend}"  # on the HUD: what runs the model
        loaded_at = time.perf_counter()  # start-up measured from here: the model is in memory
        held = HeldKeys(ignore=UI_KEYS)
        controller = make_controller(args.policy, env.keymap, held, args.seed)
        # a person can take over from an agent (M) wherever there is a keyboard
        human = None if args.headless or args.policy[0] == "human" else KeyboardController(env.keymap, held)
    # CheckpointError, bad context or replay file, --backend ort without onnxruntime: say what to fix
    except (ValueError, OSError, ImportError) as err:
        print(f"play.py: {err}", file=sys.stderr)
        return 2
    fps = args.fps if args.fps is not None else (0.0 if args.headless else env.metadata["render_fps"])
    # the HUD goes in a strip below the frame: over the frame it hid Breakout's score and lives
    window = FrameWindow(env.observation_space.shape, args.scale, f"world: {env.world_name}",
                         strip=Hud().height(HUD_LINES) + 8)
    session = Session(env, window, controller, held, fps, args.seed, args.record_dir, args.out, human)
    session.threads = threads
    # a striking (or broken) dream can be made again only if its seed is known
    print(f"play.py: seed {args.seed} (--seed {args.seed} repeats this dream)", file=sys.stderr)
    if not args.headless:
        controls = __doc__.split("Controls")[1]
        print(f"world {env.world_name}: actions and keys\n{env.keymap.help()}\nControls{controls}")
        shadowed = [a for a, combos in zip(env.keymap.actions, env.keymap.bindings)
                    if combos and all(c & UI_KEYS for c in combos)]
        if shadowed:
            print(f"note: {', '.join(shadowed)} cannot be pressed: its keys are play.py's controls")
    code = 0
    try:
        if args.out:
            session.toggle_video()
        session.run(args.frames if args.frames is not None else (HEADLESS_FRAMES if args.headless else None),
                    progress=args.headless)
    except KeyboardInterrupt:
        code = 130
    except OSError as err:  # --out cannot be written
        print(f"play.py: {err}", file=sys.stderr)
        code = 2
    finally:
        session.close()
        window.close()
    s = session.stats.summary()
    if s["frames"]:
        print(f"{s['frames']} frames in {s['seconds']:.1f} s: {s['fps']:.1f} FPS, key-to-frame latency "
              f"mean {s['latency_ms']:.1f} ms (p50 {s['latency_p50_ms']:.1f}, "
              f"p95 {s['latency_p95_ms']:.1f}), {env.steps} denoising step(s), world {env.world_name}")
    if session.first_frame_at is not None:
        print(f"start-up after the model loaded: context on screen in "
              f"{(session.context_shown_at - loaded_at) * 1e3:.0f} ms, first generated frame in "
              f"{(session.first_frame_at - loaded_at) * 1e3:.0f} ms")
    return code


if __name__ == "__main__":
    sys.exit(main())
