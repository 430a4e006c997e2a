"""redis outbox: movements and settings booked in SQL, not yet applied to Redis

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from callguard.books.database import table_options

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# MySQL/MariaDB's DATETIME drops the microseconds without fsp=6 (MySQL support came after
# this revision shipped: SQLite and PostgreSQL get the type they always had).
_AT = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')


def upgrade() -> None:
    options = table_options(op.get_bind())  # MySQL/MariaDB: utf8mb4, byte for byte
    op.create_table('redis_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('entry', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', _AT, nullable=False),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['entry'], ['ledger.id'], ),
    sa.PrimaryKeyConstraint('id'),
    **options,
    )
    with op.batch_alter_table('redis_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_redis_outbox_account'), ['account'], unique=False)


def downgrade() -> None:
    op.drop_table('redis_outbox')
