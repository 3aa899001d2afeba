"""Draw the app's example images (our own, made with Pillow): python turbo/app/examples/make_assets.py

sketch_house.png  black strokes on white, for the sketch model
edges_scene.png   a flat-shaded scene with clear edges, for the edge model
day_street.png    a daytime street seen from a car, for the unpaired driving models
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def sketch_house(size: int = 512) -> Image.Image:
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    w = 5
    d.line([(0, 420), (512, 420)], fill=0, width=w)  # ground
    d.rectangle([140, 250, 370, 420], outline=0, width=w)  # walls
    d.line([(120, 260), (255, 140), (390, 260)], fill=0, width=w, joint="curve")  # roof
    d.rectangle([230, 330, 280, 420], outline=0, width=w)  # door
    d.rectangle([165, 285, 210, 325], outline=0, width=w)  # windows
    d.rectangle([300, 285, 345, 325], outline=0, width=w)
    d.line([(187, 285), (187, 325)], fill=0, width=3)
    d.line([(322, 285), (322, 325)], fill=0, width=3)
    d.rectangle([320, 160, 345, 215], outline=0, width=w)  # chimney
    d.ellipse([400, 50, 470, 120], outline=0, width=w)  # sun
    d.ellipse([30, 300, 110, 380], outline=0, width=w)  # tree
    d.line([(70, 380), (70, 420)], fill=0, width=w)
    return im


def edges_scene(size: int = 512) -> Image.Image:
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(300):  # sky gradient
        t = y / 300
        d.line([(0, y), (size, y)], fill=(int(250 - 60 * t), int(170 - 40 * t), int(90 + 80 * t)))
    d.ellipse([330, 170, 430, 270], fill=(255, 220, 120))  # sun
    d.polygon([(0, 300), (120, 140), (230, 300)], fill=(90, 90, 130))  # mountains
    d.polygon([(150, 300), (300, 110), (470, 300)], fill=(70, 70, 110))
    d.polygon([(300, 110), (270, 150), (330, 150)], fill=(240, 240, 250))  # snow cap
    d.rectangle([0, 300, size, size], fill=(70, 140, 60))  # field
    d.rectangle([170, 330, 330, 450], fill=(170, 40, 40))  # barn
    d.polygon([(160, 335), (250, 270), (340, 335)], fill=(120, 30, 30))
    d.rectangle([225, 380, 275, 450], fill=(240, 230, 210))
    d.line([(225, 380), (275, 450)], fill=(120, 30, 30), width=4)
    d.line([(275, 380), (225, 450)], fill=(120, 30, 30), width=4)
    for x in range(0, size, 40):  # fence
        d.rectangle([x, 460, x + 6, 500], fill=(200, 180, 140))
    d.rectangle([0, 470, size, 476], fill=(200, 180, 140))
    return im.filter(ImageFilter.SMOOTH)


def day_street(width: int = 512, height: int = 384) -> Image.Image:
    im = Image.new("RGB", (width, height), (150, 195, 240))
    d = ImageDraw.Draw(im)
    horizon, cx = 170, width // 2
    d.rectangle([0, horizon, width, height], fill=(95, 95, 100))  # road
    d.polygon([(0, horizon), (cx - 20, horizon), (0, 300)], fill=(150, 150, 145))  # sidewalks
    d.polygon([(width, horizon), (cx + 20, horizon), (width, 300)], fill=(150, 150, 145))
    for i, (x0, x1, top, colour) in enumerate(
        [(0, 70, 30, (190, 150, 120)), (70, 150, 80, (210, 200, 170)), (150, 215, 120, (170, 120, 100))]
    ):
        d.rectangle([x0, top, x1, horizon + 10 - i * 3], fill=colour)  # left buildings
        d.rectangle([width - x1, top + 10, width - x0, horizon + 10 - i * 3], fill=colour)
        for wy in range(top + 12, horizon - 10, 22):
            d.rectangle([x0 + 10, wy, x0 + 22, wy + 12], fill=(120, 160, 200))
            d.rectangle([width - x1 + 10, wy + 10, width - x1 + 22, wy + 22], fill=(120, 160, 200))
    for k in range(6):  # lane marks, larger towards the viewer
        y0 = horizon + 12 + k * k * 6
        h = 4 + k * 3
        d.polygon(
            [(cx - 1 - k, y0), (cx + 1 + k, y0), (cx + 2 + 2 * k, y0 + h), (cx - 2 - 2 * k, y0 + h)],
            fill=(240, 240, 230),
        )
    d.rounded_rectangle([300, 230, 400, 290], radius=10, fill=(200, 40, 40))  # a car ahead
    d.rectangle([315, 240, 385, 260], fill=(60, 80, 100))
    d.ellipse([305, 280, 330, 300], fill=(30, 30, 30))
    d.ellipse([370, 280, 395, 300], fill=(30, 30, 30))
    d.ellipse([40, 20, 130, 50], fill=(250, 250, 250))  # clouds
    d.ellipse([330, 15, 450, 45], fill=(250, 250, 250))
    return im.filter(ImageFilter.SMOOTH)


def main() -> None:
    sketch_house().save(HERE / "sketch_house.png", optimize=True)
    edges_scene().save(HERE / "edges_scene.png", optimize=True)
    day_street().convert("RGB").save(HERE / "day_street.png", optimize=True)


if __name__ == "__main__":
    main()
