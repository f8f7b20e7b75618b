"""Test samples that show several images or a video, with boxes per image and per frame."""

from __future__ import annotations

from PIL import Image, ImageDraw

from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.data.scene_video import video_question
from vlmflow.inputs import Video, Visuals


def two_image_sample() -> tuple[Sample, Visuals]:
    """A 40 x 30 image with a red square (box in image 0) and a 30 x 44 image with a yellow circle
    (box in image 1), and the question about the square."""
    first = Image.new("RGB", (40, 30), (30, 120, 30))
    ImageDraw.Draw(first).rectangle((6, 8, 17, 19), fill=(220, 20, 20))
    second = Image.new("RGB", (30, 44), (20, 20, 200))
    ImageDraw.Draw(second).ellipse((3, 20, 14, 31), fill=(250, 250, 0))
    sample = Sample(
        sample_id="two",
        image_id="first",
        question="Is the square red or blue?",
        answer="red",
        task=TaskType.CHOOSE_ATTR,
        true_option="red",
        false_option="blue",
        objects=(SceneObject("square", "1", Box(6, 8, 12, 12)), SceneObject("circle", "2", Box(3, 20, 12, 12), image=1)),
        image_size=(40, 30),
        images=("first", "second"),
    )
    return sample, Visuals(images=(first, second))


def moving_video(n_frames: int = 4, seed: int = 0, index: int = 0) -> tuple[Sample, Visuals]:
    """A synthetic video question (:func:`vlmflow.data.scene_video.video_question`) and its frames,
    rendered; its sample's boxes are the mover in the first and in the last frame."""
    question = video_question(seed, index, n_frames)
    frames = tuple(scene.render() for scene in question.frames)
    return question.sample, Visuals(video=Video(frames, fps=question.sample.fps or 2.0))
